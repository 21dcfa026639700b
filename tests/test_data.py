"""Data sources (synthetic, tfds), augmentation on the device and per-seed data order."""

import os
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.util import tiny_config
from tna_jax import data, runner
from tna_jax import runs as runs_lib
from tna_jax.config import ConfigError, validate
from tna_jax.data import augment, batching, synthetic
from tna_jax.experiments import train as train_kind

tfds = pytest.importorskip("tensorflow_datasets")  # installed by the test extra
from tna_jax.data import tfds_source  # noqa: E402


def synthetic_cfg(**fields):
    c = tiny_config()
    c.data.source = "synthetic"
    c.data.num_samples = 1000
    for key, value in fields.items():
        c.data.synthetic[key] = value
    return c


# ---------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mixture", "teacher"])
@pytest.mark.parametrize("shape,expected_kind", [((24,), "features"), ((8, 8, 1), "image"), ((16, 12, 3), "image")])
def test_synthetic_has_the_asked_shape_split_and_is_deterministic(kind, shape, expected_kind):
    c = synthetic_cfg(kind=kind, shape=shape, num_classes=4)
    ds = data.load(c.data)
    assert ds.kind == expected_kind and ds.input_shape == shape and ds.num_classes == 4
    assert ds.sizes() == {"train": 720, "val": 80, "test": 200}  # test_fraction 0.2, val_fraction 0.1
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    counts = np.bincount(np.concatenate([ds.y_train, ds.y_val, ds.y_test]), minlength=4)
    assert counts.min() > 150, counts  # roughly balanced classes (250 each on average)
    again = data.load(c.data)
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    np.testing.assert_array_equal(again.y_test, ds.y_test)
    c.data.generation_seed = 7
    assert not np.array_equal(data.load(c.data).x_train, ds.x_train)


def nearest_mean_accuracy(ds):
    means = np.stack([ds.x_train[ds.y_train == k].reshape(-1, ds.x_train[0].size).mean(0)
                      for k in range(ds.num_classes)])
    x = ds.x_test.reshape(len(ds.x_test), -1)
    pred = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    return float(np.mean(pred == ds.y_test))


def test_mixture_difficulty_follows_class_sep_and_label_noise_flips_labels():
    easy = data.load(synthetic_cfg(class_sep=8.0, num_classes=5).data)
    hard = data.load(synthetic_cfg(class_sep=0.0, num_classes=5).data)
    assert nearest_mean_accuracy(easy) > 0.97
    assert nearest_mean_accuracy(hard) < 0.35  # chance is 0.2: no signal at all
    clean = synthetic.synthetic({"num_samples": 4000, "synthetic": {"num_classes": 5}})
    noisy = synthetic.synthetic({"num_samples": 4000, "synthetic": {"num_classes": 5, "label_noise": 0.5}})
    np.testing.assert_array_equal(clean[0], noisy[0])  # same inputs
    changed = np.mean(clean[1] != noisy[1])
    assert 0.35 < changed < 0.45, changed  # half relabelled, a fifth of those to their own class


def one_nn_accuracy(x, y, n_train):
    xtr, ytr, xte, yte = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    d = ((xte[:, None, :] - xtr[None]) ** 2).sum(-1)
    return float(np.mean(ytr[np.argmin(d, axis=1)] == yte))


def test_teacher_labels_are_a_smooth_function_of_the_inputs():
    x, y = synthetic.teacher(np.random.default_rng(3), 3000, (4,), 3, 32, 1)
    assert np.bincount(y).min() > 800  # standardised logits: balanced classes
    # Neighbours share labels: 1-NN recovers the teacher far above chance (1/3).
    assert one_nn_accuracy(x, y, 2500) > 0.85
    # Labels that ignore the inputs would not be recoverable.
    shuffled = np.random.default_rng(0).permutation(y)
    assert one_nn_accuracy(x, shuffled, 2500) < 0.45


@pytest.mark.parametrize("field,value,message", [
    ("kind", "spiral", "data.synthetic.kind must be one of"),
    ("num_classes", 1, "data.synthetic.num_classes must be an integer >= 2"),
    ("label_noise", 1.5, "data.synthetic.label_noise must be"),
    ("shape", (8, 8), r"data.synthetic.shape must be a tuple \(d,\) or \(H, W, C\)"),
    ("shape", (0,), r"data.synthetic.shape must be a tuple \(d,\) or \(H, W, C\)"),
])
def test_bad_synthetic_fields_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        synthetic.synthetic({"synthetic": {field: value}})
    if field != "shape":  # the config schema checks the scalar fields before anything runs
        with pytest.raises(ConfigError, match="config." + message):
            validate(synthetic_cfg(**{field: value}))


def test_unknown_synthetic_field_is_an_error():
    with pytest.raises(ValueError, match=r"data.synthetic.teachr_width is not a known field"):
        synthetic.synthetic({"synthetic": {"teachr_width": 3}})
    c = synthetic_cfg()
    c.data.synthetic.teachr_width = 3
    with pytest.raises(ConfigError, match="config.data.synthetic.teachr_width is not a known field"):
        validate(c)


# ---------------------------------------------------------------------------------------------
# augmentation
# ---------------------------------------------------------------------------------------------


def candidates(image, padding):
    """Every crop (and its mirror) that random_crop_flip may return for one image."""
    h, w, _ = image.shape
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    out = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[dy:dy + h, dx:dx + w]
            out += [crop, crop[:, ::-1]]
    return out


@settings(max_examples=8)
@given(padding=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_every_augmented_image_is_a_padded_crop_or_its_mirror(padding, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(6, 7, 5, 2)).astype(np.float32)
    y = np.asarray(augment.random_crop_flip(jax.random.key(seed), jnp.asarray(x), padding=padding))
    assert y.shape == x.shape and y.dtype == x.dtype
    for img, out in zip(x, y):
        assert any(np.array_equal(out, c) for c in candidates(img, padding))


def test_augmentation_is_random_per_image_and_per_key():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(400, 8, 8, 1)).astype(np.float32))
    flipped = augment.random_crop_flip(jax.random.key(0), x, padding=0)
    mirrored = np.array([np.array_equal(a, b[:, ::-1]) for a, b in zip(np.asarray(flipped), np.asarray(x))])
    assert 0.4 < mirrored.mean() < 0.6  # each image flipped with probability 1/2
    a = augment.augment_images(jax.random.key(1), x)
    b = augment.augment_images(jax.random.key(2), x)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, augment.augment_images(jax.random.key(1), x))
    moved = np.mean([not np.array_equal(u, v) for u, v in zip(np.asarray(a), np.asarray(x))])
    assert moved > 0.8  # 1 - P(offset (1, 1) and no flip) = 1 - 1/18
    assert augment.default_padding(32, 32) == 4 and augment.default_padding(8, 8) == 1
    with pytest.raises(ValueError, match=r"images must be a \(B, H, W, C\) batch"):
        augment.random_crop_flip(jax.random.key(0), x[0])


def test_crop_flip_is_wired_for_images_only():
    c = synthetic_cfg(shape=(8, 8, 1), num_classes=4)
    c.data.augment = "crop_flip"
    assert train_kind.load_problem(c)[2] is augment.augment_images
    c.data.augment = "none"
    assert train_kind.load_problem(c)[2] is None
    c.data.source = "mnist1d"
    c.data.augment = "crop_flip"
    with pytest.raises(ConfigError, match="crop_flip' needs images"):
        train_kind.load_problem(c)


def test_every_seed_has_its_own_data_order_fixed_by_its_key():
    c = tiny_config(num_seeds=3, baseline=False)
    runs = runs_lib.make_runs(c)
    keys = runs_lib.make_run_keys(c, runs)

    def order(key, epoch):  # as the training step draws it
        order_key, _ = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(key), epoch))
        return np.asarray(batching.epoch_indices(order_key, 600, 64))

    orders = [order(k, 0) for k in keys.data]
    assert not np.array_equal(order(keys.data[0], 0), order(keys.data[0], 1))  # a new order every epoch
    assert len({o.tobytes() for o in orders}) == len(orders)
    again = runs_lib.make_run_keys(c, runs)
    np.testing.assert_array_equal(np.asarray(keys.data), np.asarray(again.data))
    for o in orders:
        assert len(np.unique(o)) == o.size  # no example twice in one epoch


# ---------------------------------------------------------------------------------------------
# tfds
# ---------------------------------------------------------------------------------------------


def tfds_cfg(name, data_dir=""):
    c = tiny_config()
    c.data.source = f"tfds:{name}"
    c.data.data_dir = str(data_dir)
    return c


@pytest.mark.parametrize("name,shape,classes", [("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10),
                                                 ("cifar100", (32, 32, 3), 100)])
def test_tfds_mock_data_loads_into_a_split_normalised_dataset(name, shape, classes, monkeypatch):
    monkeypatch.setattr(tfds_source, "_has_tensorflow", lambda: False)  # the TensorFlow-free reader
    with tfds.testing.mock_data(num_examples=40):
        ds = data.load(tfds_cfg(name).data)
    assert ds.kind == "image" and ds.input_shape == shape and ds.num_classes == classes
    assert ds.sizes() == {"train": 36, "val": 4, "test": 40}
    assert ds.info["reader"] == "data_source"
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0 and ds.x_train.max() > 0.9  # uint8 / 255
    dev = data.to_device(ds)
    np.testing.assert_allclose(np.asarray(dev.x_train).mean(axis=(0, 1, 2)), 0.0, atol=1e-5)


class TinyTfdsDataset(tfds.core.GeneratorBasedBuilder):
    """A real (not mocked) tfds dataset, prepared in a temporary directory without network."""

    VERSION = tfds.core.Version("1.0.0")
    FEATURE = "tensor"  # "tensor" serialises without TensorFlow; "image" needs it (PNG encoding)

    def _info(self):
        inputs = (tfds.features.Tensor(shape=(6, 6, 3), dtype=np.uint8) if self.FEATURE == "tensor"
                  else tfds.features.Image(shape=(6, 6, 3)))
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"image": inputs, "label": tfds.features.ClassLabel(num_classes=3)}), supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(30, 0), "test": self._generate_examples(9, 1)}

    def _generate_examples(self, n, seed):
        for i, image in enumerate(tiny_images(n, seed)):
            yield i, {"image": image, "label": i % 3}


class TinyImageDataset(TinyTfdsDataset):
    """The same examples as PNG-encoded images (preparing them needs TensorFlow)."""

    FEATURE = "image"


def tiny_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 6, 6, 3), dtype=np.uint8)


def as_rows(x, y):
    """Examples as sortable byte strings (tfds shuffles the order when it writes)."""
    return sorted((np.round(xi * 255).astype(np.uint8).tobytes(), int(yi)) for xi, yi in zip(x, y))


def test_a_prepared_array_record_dataset_is_read_without_tensorflow(tmp_path, monkeypatch):
    monkeypatch.setattr(tfds_source, "_has_tensorflow", lambda: False)
    TinyTfdsDataset(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    c = tfds_cfg("tiny_tfds_dataset", tmp_path)
    c.data.val_fraction = 0.0
    ds = data.load(c.data)
    assert ds.info["reader"] == "data_source" and ds.num_classes == 3 and ds.input_shape == (6, 6, 3)
    expected = tiny_images(30, 0)
    assert as_rows(ds.x_train, ds.y_train) == sorted((im.tobytes(), i % 3) for i, im in enumerate(expected))
    assert as_rows(ds.x_test, ds.y_test) == sorted((im.tobytes(), i % 3) for i, im in enumerate(tiny_images(9, 1)))
    # Split slicing goes straight to tfds.
    c.data.train_split = "train[:10]"
    assert data.load(c.data).sizes()["train"] == 10
    # The whole pipeline trains on it, with crop-and-flip augmentation inside the vmapped step.
    c = tfds_cfg("tiny_tfds_dataset", tmp_path)
    c.data.augment = "crop_flip"
    c.train.batch_size = 8
    c.train.epochs = 1
    c.baseline = False
    c.analysis.lmc = False
    report = runner.run(c)
    assert report["data"]["sizes"] == {"train": 27, "val": 3, "test": 9} and len(report["runs"]) == 2
    assert all(np.isfinite(r["test_loss"]) for r in report["runs"])


def test_an_unprepared_dataset_fails_fast_without_network_and_says_how_to_prepare_it(tmp_path, monkeypatch):
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    for reader in ("auto", "data_source"):
        start = time.time()
        with pytest.raises(tfds_source.DatasetNotPrepared) as err:
            tfds_source.load(tfds_cfg("cifar10", tmp_path / "empty").data, reader=reader)
        assert time.time() - start < 10
        message = str(err.value)
        assert "'cifar10' is not prepared in" in message and "tfds build cifar10" in message
        assert "--config.data.data_dir=" in message and str(tmp_path / "empty") in message
    assert attempts == []
    assert not os.path.exists(tmp_path / "empty")  # nothing written either
    with pytest.raises(ValueError, match="tensorflow-datasets has no dataset 'no_such_dataset'"):
        tfds_source.load(tfds_cfg("no_such_dataset", tmp_path).data)
    with pytest.raises(ValueError, match="reader must be one of"):
        tfds_source.load(tfds_cfg("mnist", tmp_path).data, reader="pandas")


def test_the_tf_data_reader_reads_tfrecord_images_and_mock_data(tmp_path):
    pytest.importorskip("tensorflow")  # in test-full (CI, the README) and tfds; not in the plain test extra
    TinyImageDataset(data_dir=str(tmp_path)).download_and_prepare()  # TFRecord, tfds's default
    ds = data.load(tfds_cfg("tiny_image_dataset", tmp_path).data)
    assert ds.info["reader"] == "tf_data"
    assert as_rows(ds.x_test, ds.y_test) == sorted((im.tobytes(), i % 3) for i, im in enumerate(tiny_images(9, 1)))
    with pytest.raises(ValueError, match="TensorFlow-free reader cannot open"):
        tfds_source.load(tfds_cfg("tiny_image_dataset", tmp_path).data, reader="data_source")
    with tfds.testing.mock_data(num_examples=12):
        out = tfds_source.load(tfds_cfg("fashion_mnist").data, reader="tf_data")
    assert out[0].shape == (12, 28, 28, 1) and out[5] == "image"
