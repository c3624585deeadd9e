"""LoRA for stage 2 (``peft``): low-rank adapters on the LLM's linear layers (optionally CLIP's),
merged back into plain weights for the official layout.

The adapters are injected in place (:func:`peft.inject_adapter_in_model`), so the model keeps its
class, its forward and its module names (each adapted ``nn.Linear`` becomes a LoRA layer holding
the frozen ``base_layer`` and ``lora_A`` / ``lora_B``). :func:`merge_lora` folds
``W + (alpha / r) B A`` into each base layer and puts the plain layer back, after which the model
is an ordinary :class:`~hiwin_model.model.HiwinForCausalLM` again and ``save_pretrained`` writes
the official keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass(frozen=True)
class LoraSpec:
    r: int = 128  # the released LLaVA LoRA recipe: r 128, alpha 256
    alpha: float = 256.0
    dropout: float = 0.05
    vision: bool = False  # adapters on the CLIP blocks too (else CLIP stays frozen)

    def config(self, targets: tuple[str, ...]):
        from peft import LoraConfig

        if self.r <= 0:
            raise ValueError(f"LoRA rank must be > 0, got {self.r}")
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=list(targets),
                          bias="none")


def add_lora(model, spec: LoraSpec) -> None:
    """Inject adapters into ``model.llm`` (and the CLIP blocks with ``spec.vision``), in place."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(spec.config(LLM_TARGETS), model.llm)
    if spec.vision:
        inject_adapter_in_model(spec.config(CLIP_TARGETS), model.vision_tower.vision_model.encoder)


def lora_trainable(model) -> list[nn.Parameter]:
    """Stage 2 with LoRA: adapters + the projector (minus its fixed sin-cos table) + the JBU's
    ``fixup_proj``; base weights of the LLM and CLIP stay frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    for m in (model.projector, model.jbu.fixup_proj):
        for p in m.parameters():
            p.requires_grad_(True)
    model.projector.pos_embed.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base layer and restore the plain layers; returns how many."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, m in list(model.named_modules()):
        if not isinstance(m, LoraLayer):
            continue
        m.merge(safe_merge=True)  # raises on non-finite merged weights
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.get_base_layer())
        merged += 1
    return merged
