import pytest
import torch

from moe_offload.errors import MoeOffloadError
from moe_offload.quant.pack import pack, packed_words, unpack

BITS = (2, 3, 4, 8)


def random_codes(shape, bits, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.uint8)
    codes[..., -1] = 2**bits - 1  # max code in the top bits of the last word
    codes[0] = 2**bits - 1  # a full row of max codes: every word has bit 31 set
    return codes


def reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The module docstring's layout, one element at a time with Python ints (small inputs only)."""
    n, k = codes.shape

    def plane(values: list[int], b: int) -> list[int]:
        per = 32 // b
        words = [0] * (k // per)
        for i, v in enumerate(values):
            words[i // per] |= v << (b * (i % per))
        return [w - 2**32 if w >= 2**31 else w for w in words]

    rows = []
    for row in codes.tolist():
        if bits == 3:
            rows.append(plane([v & 3 for v in row], 2) + plane([v >> 2 for v in row], 1))
        else:
            rows.append(plane(row, bits))
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(4, 4096), (7, 96), (1, 32)])
def test_round_trip(bits, shape):
    codes = random_codes(shape, bits)
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32
    assert tuple(packed.shape) == (shape[0], shape[1] * bits // 32)
    assert torch.equal(unpack(packed, bits, shape[1]), codes)


@pytest.mark.parametrize("bits", BITS)
def test_layout_matches_contract(bits):
    codes = random_codes((3, 96), bits, seed=1)
    assert torch.equal(pack(codes, bits), reference_pack(codes, bits))


@pytest.mark.parametrize("bits", BITS)
def test_top_bit_survives(bits):
    codes = torch.full((2, 64), 2**bits - 1, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert torch.all(packed == -1)  # 0xFFFFFFFF
    assert torch.equal(unpack(packed, bits, 64), codes)
    # Only the last code set: only bit 31 region of the last word is used.
    codes = torch.zeros((1, 32), dtype=torch.uint8)
    codes[0, 31] = 2**bits - 1
    assert torch.equal(unpack(pack(codes, bits), bits, 32), codes)


def test_explicit_words():
    def u32(x: torch.Tensor) -> int:
        return x.item() & 0xFFFFFFFF

    codes = torch.arange(8, dtype=torch.uint8).repeat(1, 4)  # 0..7 repeated, K=32
    assert u32(pack(codes, 4)[0, 0]) == 0x76543210
    assert u32(pack(codes, 8)[0, 1]) == 0x07060504
    assert u32(pack(codes & 3, 2)[0, 0]) == 0xE4E4E4E4  # 0,1,2,3,0,1,2,3
    w3 = pack(codes, 3)
    assert tuple(w3.shape) == (1, 3)
    assert u32(w3[0, 0]) == 0xE4E4E4E4 and u32(w3[0, 1]) == 0xE4E4E4E4  # low plane
    assert u32(w3[0, 2]) == 0xF0F0F0F0  # high bit: set for codes 4..7


def test_int_inputs_and_leading_dims():
    codes = random_codes((2, 3, 64), 4).to(torch.int32)
    packed = pack(codes, 4)
    assert tuple(packed.shape) == (2, 3, 8)
    assert torch.equal(unpack(packed, 4, 64), codes.to(torch.uint8))


def test_packed_words():
    assert packed_words(4096, 4) == 512
    assert packed_words(4096, 3) == 384
    assert packed_words(4096, 2) == 256
    assert packed_words(4096, 8) == 1024


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", [16, 48, 100])
def test_k_not_multiple_of_32_rejected(bits, k):
    with pytest.raises(MoeOffloadError, match=rf"K={k}.*{bits}-bit"):
        pack(torch.zeros(2, k, dtype=torch.uint8), bits)
    with pytest.raises(MoeOffloadError, match=rf"K={k}"):
        packed_words(k, bits)


def test_bad_inputs_rejected():
    with pytest.raises(MoeOffloadError, match="bits=5"):
        pack(torch.zeros(2, 32, dtype=torch.uint8), 5)
    with pytest.raises(MoeOffloadError, match=r"\[0, 3\]"):
        pack(torch.full((2, 32), 4, dtype=torch.uint8), 2)
    with pytest.raises(MoeOffloadError, match=r"\[0, 15\]"):
        pack(torch.full((2, 32), -1, dtype=torch.int32), 4)
    with pytest.raises(MoeOffloadError, match="integer"):
        pack(torch.zeros(2, 32), 4)
    with pytest.raises(MoeOffloadError, match="int32"):
        unpack(torch.zeros(2, 5, dtype=torch.int32), 4, 32)
    with pytest.raises(MoeOffloadError, match="int32"):
        unpack(torch.zeros(2, 4, dtype=torch.int64), 4, 32)
