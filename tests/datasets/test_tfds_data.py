"""from_tfds with tensorflow-datasets' mock data (no TensorFlow needed), and the grouping it applies."""

import builtins
import json

import numpy as np
import pytest

from fedjax_lite.datasets import tfds_data
from fedjax_lite.datasets.errors import DatasetNotFoundError, MissingDependencyError


def test_natural_client_key_and_partitioners():
  examples = [{"image": np.full((2, 2, 1), 255, np.uint8), "label": k % 3,
               "meta": {"user_id": f"user{k % 2}".encode()}} for k in range(6)]
  examples = [{"image": e["image"], "label": e["label"], "user_id": e["meta"]["user_id"]} for e in examples]
  data = tfds_data.federate_examples(examples)
  assert data.client_ids == ("user0", "user1")
  np.testing.assert_array_equal(data["user1"]["y"], [1, 0, 2])
  assert data.element_spec["x"] == ((2, 2, 1), np.float32) and data["user0"]["x"].max() == 1.0
  iid = tfds_data.federate_examples(examples, partition="iid", num_clients=3, seed=0)
  assert iid.num_clients == 3 and iid.num_examples == 6
  shards = tfds_data.federate_examples(examples, partition="shards", num_clients=3, shards_per_client=1, seed=0)
  assert shards.num_clients == 3
  with pytest.raises(ValueError, match="client_key 'nope'"):
    tfds_data.federate_examples(examples, client_key="nope")
  with pytest.raises(ValueError, match="partition must be one of"):
    tfds_data.federate_examples(examples, partition="random")


def test_missing_extra_is_named(monkeypatch):
  real_import = builtins.__import__
  def no_tfds(name, *args, **kwargs):
    if name == "tensorflow_datasets":
      raise ImportError(name)
    return real_import(name, *args, **kwargs)
  monkeypatch.setattr(builtins, "__import__", no_tfds)
  with pytest.raises(MissingDependencyError, match=r"fedjax_lite\[tfds\]"):
    tfds_data.from_tfds("mnist", split="train")


def test_mock_data_mnist_dirichlet():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    data = tfds_data.from_tfds("mnist", split="train", partition="dirichlet", num_clients=4, alpha=1.0, seed=1)
  assert data.num_examples == 40 and data.num_clients == 4
  assert data.element_spec["x"] == ((28, 28, 1), np.float32) and data.element_spec["y"] == ((), np.int32)


def test_unprepared_dataset_is_explained(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(DatasetNotFoundError) as raised:
    tfds_data.from_tfds("mnist", split="train", data_dir=tmp_path)
  message = str(raised.value)
  # The command given must write what tfds.data_source reads: plain `tfds build` writes TFRecord.
  assert f"tfds build mnist --data_dir {tmp_path} --file_format=array_record" in message
  assert "pass download=True" in message and "--download" not in message


def _prepared_as_tfrecord(data_dir):
  """A dataset folder as `tfds build mnist` (TFDS's default format) leaves it: dataset_info.json says tfrecord."""
  version_dir = data_dir / "mnist" / "3.0.1"
  version_dir.mkdir(parents=True)
  split = {"numBytes": "100", "shardLengths": ["10"], "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"}
  info = {"name": "mnist", "version": "3.0.1", "fileFormat": "tfrecord",
          "moduleName": "tensorflow_datasets.image_classification.mnist",
          "splits": [{"name": "train", **split}, {"name": "test", **split}]}
  (version_dir / "dataset_info.json").write_text(json.dumps(info))


@pytest.mark.parametrize("download", [False, True])
def test_a_tfrecord_dataset_gets_the_commands_that_make_array_record_files(tmp_path, download):
  """Regression: the advice was `tfds build mnist`, which writes the TFRecord files that cannot be read."""
  pytest.importorskip("tensorflow_datasets")
  _prepared_as_tfrecord(tmp_path)
  with pytest.raises(DatasetNotFoundError) as raised:
    tfds_data.from_tfds("mnist", split="train", data_dir=tmp_path, download=download)
  message = str(raised.value)
  assert "as TFRecord files" in message
  assert f"tfds convert_format --dataset_dir {tmp_path}/mnist --out_file_format array_record" in message
  assert f"tfds build mnist --data_dir {tmp_path} --file_format=array_record" in message
