import json

import numpy as np
import pytest
import torch

from lilliput.core.tokenizer import ByteTokenizer
from lilliput.train.shards import TokenShards


def _corpus(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("abcdefghij" * 30)  # 300 bytes
    (folder / "sub" / "b.md").write_text("0123456789" * 20)  # 200 bytes
    (folder / "c.jsonl").write_text(json.dumps({"text": "xy" * 50}) + "\n\n" + json.dumps({"text": "z" * 100}) + "\n")
    (folder / "skip.bin").write_bytes(b"\x00\x01")
    return folder


def test_folder_is_tokenized_once_into_uint16_shards(tmp_path):
    folder, tok = _corpus(tmp_path), ByteTokenizer()
    shards = TokenShards.cached(folder, tok, cache_dir=tmp_path / "cache", shard_tokens=256)
    assert shards.tokens == 700 and shards.meta["documents"] == 4
    assert [len(s) for s in shards.shards] == [256, 256, 188] and shards.shards[0].dtype == np.uint16
    assert isinstance(shards.shards[0], np.memmap)
    stream = np.concatenate(shards.shards)  # files sorted: a.txt, c.jsonl (2 documents), sub/b.md
    assert bytes(stream.astype(np.uint8)).decode() == "abcdefghij" * 30 + "xy" * 50 + "z" * 100 + "0123456789" * 20
    again = TokenShards.cached(folder, tok, cache_dir=tmp_path / "cache", shard_tokens=256)
    assert again.folder == shards.folder  # unchanged files: the cache is reused
    (folder / "a.txt").write_text("changed")
    assert TokenShards.cached(folder, tok, cache_dir=tmp_path / "cache", shard_tokens=256).folder != shards.folder


def test_batches_are_pure_and_train_and_val_do_not_overlap(tmp_path):
    text = tmp_path / "t.txt"
    shard = "".join(chr(65 + i % 26) for i in range(400)) + "#" * 100  # letters, then the held-out tail
    text.write_text(shard * 2)
    shards = TokenShards.cached(text, ByteTokenizer(), cache_dir=tmp_path / "c", shard_tokens=500)
    train = shards.batches("train", batch_size=64, seq_len=9, val_fraction=0.2)
    val = shards.batches("val", batch_size=64, seq_len=9, val_fraction=0.2)
    a = train(3)["idx"]
    assert a.shape == (64, 10) and a.dtype == torch.int64 and torch.equal(a, train(3)["idx"])
    assert not torch.equal(a, train(4)["idx"])
    assert train.tokens == 2 * (400 - 9) and val.tokens == 2 * (100 - 9)
    t = torch.cat([train(i)["idx"] for i in range(20)])
    assert torch.equal((t[:, 1:] - t[:, :-1]) % 26, torch.ones(64 * 20, 9, dtype=torch.int64))  # contiguous, no "#"
    assert torch.cat([val(i)["idx"] for i in range(5)]).eq(ord("#")).all()


def test_uint32_for_a_large_vocabulary_and_clear_errors(tmp_path):
    class Big(ByteTokenizer):
        vocab_size = 70000
        eos_id = 69999

    text = tmp_path / "t.txt"
    text.write_text("hello")
    shards = TokenShards.cached(text, Big(), cache_dir=tmp_path / "c")
    assert shards.shards[0].dtype == np.uint32 and shards.shards[0].tolist() == list(b"hello") + [69999]
    with pytest.raises(ValueError, match="no window"):
        shards.batches("train", 2, seq_len=64)
    with pytest.raises(FileNotFoundError, match="not found"):
        TokenShards.cached(tmp_path / "missing", ByteTokenizer(), cache_dir=tmp_path / "c")
