import json
import logging
import math

import pytest
import torch

import maxq
from maxq.deploy.compress import CompressedError, index_bits, load_compressed, read_compressed, save_compressed

from ..conftest import PATTERNS
from ..corrupt import assert_each_flip_rejected
from ..nets import mlp, small_cnn, train_steps


def _folded(builder, n, m):
    model = builder()
    sp = maxq.sparsify_(
        model,
        maxq.SRSTEConfig(n=n, m=m),
        filter_fn=lambda mod, name: isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and name not in ("0",),
    )
    train_steps(model, sp, steps=1)
    return maxq.fold_(model)


@pytest.mark.parametrize("n, m", PATTERNS)
@pytest.mark.parametrize("builder", [lambda: small_cnn(channels=32), lambda: mlp((64, 128, 96, 16))])
def test_round_trip_is_bit_exact(n, m, builder, tmp_path):
    model = _folded(builder, n, m)
    state = model.state_dict()
    layers = model.maxq_layout["layers"]
    info = save_compressed(state, tmp_path / "m.maxq", n, m, layers)
    restored = load_compressed(tmp_path / "m.maxq")
    assert restored.keys() == state.keys()
    for k in state:
        assert restored[k].dtype == state[k].dtype
        assert torch.equal(restored[k].view(torch.uint8) if restored[k].is_floating_point() else restored[k],
                           state[k].view(torch.uint8) if state[k].is_floating_point() else state[k]), k  # fmt: skip
    # Storage of the sparse layers: within a byte per layer of the SPEC §6 bound.
    bound = sum(math.prod(state[f"{name}.weight"].shape) // m * (n * 32 + n * index_bits(m)) for name in layers) / 8
    assert info.sparse_bound_bytes == pytest.approx(bound)
    assert bound <= info.sparse_bytes <= bound + len(layers)
    assert info.file_bytes < info.dense_equivalent_bytes + info.other_bytes


def test_blocks_with_fewer_nonzeros_and_fp16(tmp_path):
    w = torch.zeros(8, 16, dtype=torch.float16)
    w[0, 1] = 1.5  # a block with a single nonzero
    w[1, 4:6] = torch.tensor([-2.0, 3.0])
    state = {"fc.weight": w, "fc.bias": torch.ones(8)}
    save_compressed(state, tmp_path / "h.maxq", 2, 4, ["fc"])
    out = load_compressed(tmp_path / "h.maxq")
    assert torch.equal(out["fc.weight"], w) and out["fc.weight"].dtype == torch.float16


def test_refuses_non_nm_layers(tmp_path):
    with pytest.raises(CompressedError, match="not 2:4"):
        save_compressed({"fc.weight": torch.ones(4, 8)}, tmp_path / "x.maxq", 2, 4, ["fc"])
    with pytest.raises(CompressedError, match="not in the state dict"):
        save_compressed({"fc.weight": torch.ones(4, 8)}, tmp_path / "x.maxq", 2, 4, ["gone"])


def _rewrite(path, header_fn=None, data_fn=None):
    """Rewrite a compressed file's header / data as an older or buggy writer would have: without the hash
    (version 1), so the checks behind the hash are reached."""
    raw = bytearray(path.read_bytes())
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    body = raw[8 + size :]
    meta = json.loads(header["__metadata__"]["maxq"])
    meta["version"] = 1
    header["__metadata__"] = {"maxq": json.dumps(meta)}
    if header_fn:
        header_fn(header)
    if data_fn:
        data_fn(header, body)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + body)


def _good(tmp_path):
    model = _folded(lambda: small_cnn(channels=32), 2, 4)
    good = tmp_path / "good.maxq"
    save_compressed(model.state_dict(), good, 2, 4, model.maxq_layout["layers"])
    return good, model.state_dict()


def test_tampered_files_are_reported(tmp_path):
    good, _ = _good(tmp_path)
    # A violating group: two kept values at the same position of a block.
    dup = tmp_path / "dup.maxq"
    dup.write_bytes(good.read_bytes())

    def zero_first_index_byte(header, body):
        start, _ = header["3.weight.indices"]["data_offsets"]
        body[start] = 0  # 2-bit indices: the first two blocks become [0, 0]

    _rewrite(dup, data_fn=zero_first_index_byte)
    with pytest.raises(CompressedError, match="repeats an index"):
        load_compressed(dup)
    # Truncated.
    cut = tmp_path / "cut.maxq"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CompressedError, match="truncated or corrupt"):
        load_compressed(cut)
    # Another format version.
    old = tmp_path / "old.maxq"
    old.write_bytes(good.read_bytes())

    def bump(header):
        meta = json.loads(header["__metadata__"]["maxq"])
        meta["version"] = 99
        header["__metadata__"]["maxq"] = json.dumps(meta)

    _rewrite(old, header_fn=bump)
    with pytest.raises(CompressedError, match="version 99"):
        read_compressed(old)


def test_any_changed_byte_is_rejected(tmp_path):
    good, state = _good(tmp_path)
    data = good.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    digest = data.find(b'"sha256"')
    assert 0 < digest < header_end
    # The length, every 3rd header byte, the hash and its key, then every 97th payload byte and the last ones.
    positions = {*range(16), *range(0, header_end, 3), *range(digest, digest + 76), *range(len(data) - 16, len(data))}
    positions = sorted(positions | set(range(header_end, len(data), 97)))
    bad = tmp_path / "bad.maxq"
    assert_each_flip_rejected(data, positions, 0x01, bad, load_compressed, CompressedError)
    # The four 0xff bytes of the issue, in the middle of the payload.
    mid = (header_end + len(data)) // 2
    bad.write_bytes(data[:mid] + b"\xff" * 4 + data[mid + 4 :])
    with pytest.raises(CompressedError, match="SHA-256 does not match"):
        load_compressed(bad)
    restored = load_compressed(good)
    assert all(torch.equal(restored[k], state[k]) for k in state)


def test_version_1_files_load_with_a_warning(tmp_path, caplog):
    good, state = _good(tmp_path)
    _rewrite(good)  # as the first maxq release wrote it: no hash
    with caplog.at_level(logging.WARNING, logger="maxq"):
        restored = load_compressed(good)
    assert "no content hash" in caplog.text and "good.maxq" in caplog.text
    assert all(torch.equal(restored[k], state[k]) for k in state)
    raw = bytearray(good.read_bytes())
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    meta = json.loads(header["__metadata__"]["maxq"])
    meta["version"] = 2  # claims the hashed version but has no hash: a changed file, not an old one
    header["__metadata__"]["maxq"] = json.dumps(meta)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    good.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + size :])
    with pytest.raises(CompressedError, match="without its SHA-256"):
        load_compressed(good)
