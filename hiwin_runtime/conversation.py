"""Prompt templates of the released model: ``vicuna_v1`` (stage 2, inference) and ``plain`` (stage 1).

Each template renders segments ``(text, supervised)``, so training masks exactly what the model did
not write, and inference is the same rendering with an empty last answer. ``<image>`` marks where
the visual tokens go; it is never turned into a token id.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass(frozen=True)
class Template:
    name: str

    def segments(self, turns: list[tuple[str, str | None]], eos: str) -> list[tuple[str, bool]]:
        """turns = [(user, assistant or None)] -> [(text, supervised)]; ``None`` = generation prompt."""
        if not turns:
            raise ValueError("a conversation needs at least one turn")
        if self.name == "vicuna_v1":
            segs: list[tuple[str, bool]] = [(VICUNA_SYSTEM + " ", False)]
            for i, (user, answer) in enumerate(turns):
                if answer is None:
                    if i != len(turns) - 1:
                        raise ValueError("only the last turn may lack an answer")
                    segs.append((f"USER: {user} ASSISTANT:", False))
                else:
                    segs.append((f"USER: {user} ASSISTANT:", False))
                    segs.append((f" {answer}{eos}", True))
            return segs
        if self.name == "plain":
            if len(turns) != 1:
                raise ValueError("the plain template holds exactly one (image, caption) turn")
            user, answer = turns[0]
            prefix = IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in user else user
            if answer is None:
                return [(prefix, False)]
            return [(prefix, False), (answer + "\n", True)]
        raise ValueError(f"unknown template {self.name!r} (known: vicuna_v1, plain)")

    def prompt(self, question: str, eos: str = "</s>") -> str:
        """Inference prompt for one image and one question."""
        if self.name == "plain":
            return IMAGE_PLACEHOLDER + question
        return "".join(t for t, _ in self.segments([(f"{IMAGE_PLACEHOLDER}\n{question}", None)], eos))


TEMPLATES = {"vicuna_v1": Template("vicuna_v1"), "plain": Template("plain")}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r} (known: {', '.join(TEMPLATES)})") from None
