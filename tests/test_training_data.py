"""The CIFAR binary reader, on small files written here in the official format, and resume."""

import numpy as np
import pytest
import torch

from triton_adder import train
from triton_adder.training import datasets


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reader_official_binary_format(tmp_path, name):
    folder, train_files, test_files, label_bytes, label_index = datasets.CIFAR_LAYOUT[name]
    rng = np.random.default_rng(0)
    expected = {}
    for index, file in enumerate(train_files + test_files):
        count = 3 + index  # odd record counts per file
        labels = rng.integers(0, 100 if name == "cifar100" else 10, size=(count, label_bytes), dtype=np.uint8)
        pixels = rng.integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8)
        (tmp_path / folder).mkdir(exist_ok=True)
        np.concatenate([labels, pixels.reshape(count, -1)], axis=1).tofile(tmp_path / folder / file)
        expected[file] = (pixels, labels[:, label_index])
    (train_pixels, train_labels), (test_pixels, test_labels) = datasets.load_cifar(name, tmp_path)
    want_train = [expected[f] for f in train_files]
    assert torch.equal(train_pixels, torch.from_numpy(np.concatenate([p for p, _ in want_train])))
    assert train_labels.tolist() == np.concatenate([lab for _, lab in want_train]).tolist()
    assert torch.equal(test_pixels, torch.from_numpy(expected[test_files[0]][0]))
    assert test_labels.tolist() == expected[test_files[0]][1].tolist()
    (tmp_path / folder / train_files[0]).write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="not a whole number"):
        datasets.load_cifar(name, tmp_path)
    (tmp_path / folder / train_files[0]).unlink()
    with pytest.raises(FileNotFoundError, match="--data-root must hold"):
        datasets.load_cifar(name, tmp_path)


def test_distributed_shares_make_the_single_process_batch():
    """Rank r's step-s batch, over both ranks, is the one-process step-s batch of twice the size."""
    images = torch.arange(16, dtype=torch.float32).view(16, 1, 1, 1)
    data = datasets.TensorData((images, torch.arange(16)), (images, torch.arange(16)), lambda x, g: x, 10, seed=3)
    single = [labels.tolist() for _, labels in data.batches(2, 0, 1, 8)]
    shards = [[labels.tolist() for _, labels in data.batches(2, rank, 2, 4)] for rank in range(2)]
    assert [sorted(a + b) for a, b in zip(*shards)] == [sorted(batch) for batch in single]
    assert single != [labels.tolist() for _, labels in data.batches(3, 0, 1, 8)], "the order depends on the epoch"


def test_same_seed_same_weights_and_checkpoint_loads(tmp_path, monkeypatch):
    """Two 3-epoch runs with one seed end bitwise equal (one thread, same ops in the same order), the
    precondition of resume; the per-epoch checkpoint loads with weights_only=True. Resume itself is untested."""
    pytest.importorskip("mlxtend")
    monkeypatch.setenv("TRITON_ADDER_CPU_COMPILE", "0")
    from triton_adder.training import checkpoint  # noqa: PLC0415

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        common = dict(epochs=3, batch_size=16, train_subset=48, progress=False)
        train.train(output_dir=tmp_path / "a", **common)
        train.train(output_dir=tmp_path / "b", **common)
    finally:
        torch.set_num_threads(threads)
    name = "lenet5bn-adder-paper-alr"
    assert checkpoint.load(tmp_path / "b" / f"{name}.ckpt")["epoch"] == 3
    first = torch.load(tmp_path / "a" / f"{name}.pt", weights_only=True)
    second = torch.load(tmp_path / "b" / f"{name}.pt", weights_only=True)
    assert all(torch.equal(first[k], second[k]) for k in first)
