import pytest
import torch

from hiwin_model.layout import layout_image_tokens, num_image_tokens


def _crops(n, C=3):
    # crop i, token t -> value (i, t, 0...)
    x = torch.zeros(n, 144, C)
    x[:, :, 0] = torch.arange(n)[:, None].float()
    x[:, :, 1] = torch.arange(144)[None].float()
    return x


NL, COMMA = torch.full((3,), -1.0), torch.full((3,), -2.0)


def test_no_slices():
    c = _crops(1)
    assert torch.equal(layout_image_tokens(c, None, NL, COMMA), c[0])


@pytest.mark.parametrize("grid,count", [((3, 2), 1033), ((3, 3), 1477), ((2, 1), 445), ((1, 2), 2*12*13 + 145)])
def test_counts_and_positions(grid, count):
    cols, rows = grid
    out = layout_image_tokens(_crops(cols * rows + 1), grid, NL, COMMA)
    assert out.shape[0] == count == num_image_tokens(grid)
    width = cols * 12 + 1
    for R in range(rows * 12):
        row = out[R * width:(R + 1) * width]
        assert torch.equal(row[-1], NL)  # newline after every stitched row
        for X in range(cols * 12):
            crop = (R // 12) * cols + X // 12
            tok = (R % 12) * 12 + X % 12
            assert row[X, 0] == crop and row[X, 1] == tok
    sep = out[rows * 12 * width]
    assert torch.equal(sep, COMMA if cols > 1 else NL)
    assert torch.equal(out[-144:], _crops(cols * rows + 1)[-1])


def test_wrong_crop_count():
    with pytest.raises(ValueError, match="needs 7 crops"):
        layout_image_tokens(_crops(5), (3, 2), NL, COMMA)
