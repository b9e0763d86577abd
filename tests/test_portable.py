"""Exported handle blobs: round trips, sealing, and refusal of anything altered or foreign."""

from __future__ import annotations

import pytest
import torch

from vllm_compaction import portable
from vllm_compaction.portable import BadBlob

KEY = bytes(range(32))
MANIFEST = {"fingerprint": "abc", "slots": 4}


def _ranks(count: int = 2, layers: int = 3) -> list[portable.Layers]:
    torch.manual_seed(0)
    return [
        {
            "keys": [torch.randn(2, 4, 8).bfloat16() for _ in range(layers)],
            "values": [torch.randn(2, 4, 8).bfloat16() for _ in range(layers)],
            "bias": [torch.randn(2, 4) for _ in range(layers)],
        }
        for _ in range(count)
    ]


def _assert_same(got: list[portable.Layers], expected: list[portable.Layers]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert set(g) == set(e)
        for part in e:
            assert len(g[part]) == len(e[part])
            for a, b in zip(g[part], e[part], strict=True):
                assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("key", [None, KEY])
def test_round_trip_keeps_every_tensor_and_the_manifest(key):
    ranks = _ranks()
    manifest, got = portable.unpack(portable.pack(MANIFEST, ranks, key), key)
    assert manifest == MANIFEST
    _assert_same(got, ranks)


def test_page_tables_of_packed_heads_travel_and_a_rank_needs_its_keys():
    ranks = _ranks()
    for layers in ranks:
        layers["pages"] = [torch.tensor([[0, -1], [1, 2]]) for _ in range(3)]
    _, got = portable.unpack(portable.pack(MANIFEST, ranks, None), None)
    _assert_same(got, ranks)
    for layers in ranks:
        del layers["keys"]
    with pytest.raises(BadBlob, match="lacks keys, values or bias"):
        portable.unpack(portable.pack(MANIFEST, ranks, None), None)


def test_a_sealed_blob_hides_its_content_and_needs_the_key():
    blob = portable.pack(MANIFEST, _ranks(), KEY)
    assert blob.startswith(portable.SEALED) and b"fingerprint" not in blob
    with pytest.raises(BadBlob, match="no seal key"):
        portable.unpack(blob, None)
    with pytest.raises(BadBlob, match="altered or sealed with another key"):
        portable.unpack(blob, bytes(32))
    altered = bytearray(blob)
    altered[-40] ^= 1
    with pytest.raises(BadBlob, match="altered"):
        portable.unpack(bytes(altered), KEY)


def test_a_server_with_a_key_refuses_unsealed_blobs():
    with pytest.raises(BadBlob, match="only blobs sealed"):
        portable.unpack(portable.pack(MANIFEST, _ranks(), None), KEY)


def test_altered_or_foreign_bytes_are_refused():
    blob = bytearray(portable.pack(MANIFEST, _ranks(), None))
    blob[-3] ^= 0x40  # inside the last tensor's data
    with pytest.raises(BadBlob, match="checksum"):
        portable.unpack(bytes(blob), None)
    for garbage in (b"", b"\x00" * 7, b"not a blob at all", b"\xff" * 64):
        with pytest.raises(BadBlob, match="not a compaction export"):
            portable.unpack(garbage, None)


def test_missing_layers_or_ranks_are_refused():
    ranks = _ranks()
    del ranks[1]["values"][2]
    with pytest.raises(BadBlob, match="different layer counts"):
        portable.unpack(portable.pack(MANIFEST, ranks, None), None)
    gap = portable.pack(MANIFEST, _ranks(count=1), None)
    renamed = gap.replace(b'"0/', b'"1/')  # tensors of rank 1 without a rank 0
    with pytest.raises(BadBlob):
        portable.unpack(renamed, None)
