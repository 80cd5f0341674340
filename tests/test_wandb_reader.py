"""read_wandb_history parses W&B run files whose log blocks start at the file header's end (wandb-core's Go writer)
or at the file start (the old Python writer) — records crossing block edges and zero trailers included."""

import json

from wandb.proto import wandb_internal_pb2 as pb

from trainer.tracking import read_wandb_history

BLOCK = 32768


def write_log(records: list[bytes], origin: int) -> bytes:
    """A LevelDB log after a 7-byte ':W&B' header, its blocks counted from byte ``origin``."""
    out = bytearray(b":W&B" + (0xBEE1).to_bytes(2, "little") + b"\x00")
    for rec in records:
        first, rest = True, rec
        while True:
            left = BLOCK - (len(out) - origin) % BLOCK
            if left < 7:
                out += b"\x00" * left
                continue
            chunk, rest = rest[: left - 7], rest[left - 7 :]
            kind = (1 if not rest else 2) if first else (4 if not rest else 3)
            out += b"\x00\x00\x00\x00" + len(chunk).to_bytes(2, "little") + bytes([kind]) + chunk
            first = False
            if not rest:
                break
    return bytes(out)


def history(step: int, pad: int) -> bytes:
    rec = pb.Record()
    for key, value in (("step", step), ("objective/grpo/kept_token_frac", 0.2), ("pad", "x" * pad)):
        item = rec.history.item.add()
        item.key, item.value_json = key, json.dumps(value)
    return rec.SerializeToString()


def test_reader_handles_both_block_origins(tmp_path):
    # the first record is sized so that the second header starts at byte 32764: inside the first block of an
    # origin-7 log but in the last 6 bytes of the block of an origin-0 reading (the flake this test pins)
    pad = next(p for p in range(32600, 32800) if len(history(0, p)) == 32764 - 14)
    records = [history(0, pad)] + [history(i, p) for i, p in enumerate([100, 5, 40000, 31, 32700, 7, 70000, 3], 1)]
    for origin in (7, 0):
        path = tmp_path / f"run-{origin}.wandb"
        path.write_bytes(write_log(records, origin))
        rows = read_wandb_history(path)
        assert [r["step"] for r in rows] == list(range(len(records)))
        assert all(r["objective/grpo/kept_token_frac"] == 0.2 for r in rows)
