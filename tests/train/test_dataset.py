import numpy as np
import torch

from hescape.config import ImageEncoderConfig
from hescape.models import create_image_encoder
from hescape.train.dataset import (
    Collate,
    ImageSpec,
    PairedDataset,
    ResumableSampler,
    donor_codes,
    images_to_input,
)


def _patches(n=6, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_images_to_input_matches_encoder_preprocessing():
    enc = create_image_encoder(ImageEncoderConfig(name="tiny_cnn", image_size=24))
    patches = _patches()
    ours = images_to_input(patches, ImageSpec.of(enc))
    theirs = enc.preprocess_images(patches)
    assert ours.shape == (6, 3, 24, 24)
    torch.testing.assert_close(ours, theirs)


def test_donor_codes_index_training_donors_only():
    codes = donor_codes(np.array(["b", "a", "z", "b"]), ["b", "a"])
    assert codes.tolist() == [1, 0, -1, 1]


def test_dataset_items_and_collate():
    patches = _patches(8)
    gene = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    donors = np.array([0, 1] * 4)
    ds = PairedDataset(np.array([5, 2, 7]), gene_x=gene, donors=donors, patches=patches)
    item = ds[1]
    assert item["index"] == 2 and item["donor"] == 0 and item["image"].shape == (16, 16, 3)
    enc = create_image_encoder(ImageEncoderConfig(name="tiny_cnn"))
    batch = Collate(enc)([ds[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, enc.input_size, enc.input_size)
    assert batch["index"].tolist() == [5, 2, 7]
    torch.testing.assert_close(batch["gene"][0], torch.from_numpy(gene[5]))


def test_augmented_collate_is_deterministic_per_batch():
    patches = _patches(4)
    ds = PairedDataset(np.arange(4), gene_x=np.zeros((4, 2), np.float32),
                       donors=np.zeros(4, int), patches=patches)
    enc = create_image_encoder(ImageEncoderConfig(name="tiny_cnn"))
    collate = Collate(enc, augment=0.1, seed=3)
    a, b = collate([ds[i] for i in range(4)]), collate([ds[i] for i in range(4)])
    plain = Collate(enc)([ds[i] for i in range(4)])
    torch.testing.assert_close(a["image"], b["image"])
    assert not torch.allclose(a["image"], plain["image"])


def test_deferred_collate_normalised_on_device_equals_loader_path():
    """GPU loaders hand over uint8 (4x fewer bytes); the loop's to_device finishes the job and
    must give exactly what the CPU collate gives (here on CPU, the same code path)."""
    from hescape.train.loop import to_device

    ds = PairedDataset(np.arange(5), gene_x=np.zeros((5, 2), np.float32),
                       donors=np.zeros(5, int), patches=_patches(5))
    enc = create_image_encoder(ImageEncoderConfig(name="tiny_cnn", image_size=24))
    items = [ds[i] for i in range(5)]
    deferred = Collate(enc, defer_normalize=True)(items)
    assert deferred["image"].dtype == torch.uint8 and deferred["image"].shape == (5, 3, 16, 16)
    done = to_device(deferred, torch.device("cpu"), channels_last=True, encoder=enc)
    torch.testing.assert_close(done["image"], Collate(enc)(items)["image"])
    assert done["image"].is_contiguous(memory_format=torch.channels_last)
    # HED jitter needs floats: deferral is ignored when augmenting
    assert Collate(enc, augment=0.1, defer_normalize=True)(items)["image"].dtype == torch.float32


def test_sampler_shards_disjointly_and_resumes_mid_epoch():
    ds = PairedDataset(np.arange(50), gene_x=np.zeros((50, 1), np.float32),
                       donors=np.zeros(50, int), features=np.zeros((50, 2), np.float32))
    shards = [ResumableSampler(ds, batch_size=8, rank=r, world_size=2, seed=1) for r in (0, 1)]
    orders = []
    for s in shards:
        s.set_position(epoch=2)
        orders.append(list(s))
    assert len(orders[0]) == len(orders[1]) == 25
    assert not set(orders[0]) & set(orders[1])
    assert shards[0].batches_per_epoch() == 3  # drop_last contrastive batches
    shards[0].set_position(epoch=2, skip_batches=2)
    assert list(shards[0]) == orders[0][16:]


def test_simulated_dataset_cache_is_keyed_by_simulator_version(tmp_path, monkeypatch):
    """A changed simulator must not silently reuse data simulated by the old one."""
    import importlib

    from hescape.config import StudyConfig
    from hescape.train.inputs import resolve_dataset

    simulate_module = importlib.import_module("hescape.data.simulate")  # not the function

    cfg = StudyConfig.model_validate({
        "name": "t", "storage_dir": str(tmp_path),
        "data": {"simulate": {"n_donors": 3, "spots_per_donor": 20, "patch_size": 16,
                              "n_genes": 20}}})
    first = resolve_dataset(cfg, progress=False)
    assert resolve_dataset(cfg, progress=False) == first  # cached
    monkeypatch.setattr(simulate_module, "SIMULATOR_VERSION",
                        simulate_module.SIMULATOR_VERSION + 1)
    second = resolve_dataset(cfg, progress=False)
    assert second != first and (second / "manifest.json").is_file()
