"""Apple's pfl-research as a peer: the two peer workloads through pfl's own simulation API, timed per round.

Where this sits: ``benchmarks/`` compares the library with the fastest open-source simulator we know of, pfl-research
(``pfl`` 0.6.0 on PyTorch; Granqvist et al., "pfl-research: simulation framework for accelerating research in
Private Federated Learning", NeurIPS 2024 Datasets & Benchmarks, arXiv:2404.06430). It runs in its own virtual
environment (PyTorch and pfl are no dependency of the library); ``benchmarks/README.md`` ("pfl-research as a peer")
has the commands that make it. ``peer_side_by_side.py`` runs this script and the library's counterpart alternately
and prints the ratios. Never part of the test suite.

How pfl is driven, as its own benchmarks (``benchmarks/image_classification/pytorch/train.py`` in pfl-research) do:
a ``PyTorchModel`` wrapping an ``nn.Module`` with ``loss``/``metrics`` methods, ``torch.optim.SGD`` as the local
optimizer and as the central one (learning rate 1.0), ``FederatedAveraging`` run by a ``SimulatedBackend`` over a
``FederatedDataset`` of in-memory users whose arrays are already torch tensors, ``NNTrainHyperParams(local
learning rate, 1 epoch, batch size)``, a weighting postprocessor, and no evaluation during the timed rounds.
Multi-worker mode is pfl's documented one: the same script started once per worker by ``torchrun --standalone
--nproc_per_node=N`` (gloo on CPU), each worker training its share of the cohort, one all-reduce per round; with
``OMP_NUM_THREADS=1`` each worker runs single-threaded PyTorch.

Workloads (the same as the library's side, ``peer_side_by_side.py``):

* ``standard``: the McMahan et al. CNN (conv 5x5x32 SAME, pool, conv 5x5x64 SAME, pool, dense 512, dense 62),
  10 users x 200 random 28x28x1 examples, batch 20, 1 epoch, local SGD 0.02, users weighted by examples;
* ``cifar10``: pfl's CIFAR10 benchmark shape (``configs/baseline.yaml``: ``simple_cnn`` -- conv 3x3x32 VALID, conv
  3x3x64 VALID, pool, dropout 0.25, dense 128, dropout 0.5, dense 10 -- cohort 50, 50 examples per user of
  32x32x3, batch 10, 1 epoch, local SGD 0.1, users weighted equally).

Every round trains the whole population (the cohort is every user, sampled with pfl's ``minimize_reuse``
sampler). Times are taken by a callback at the end of every central iteration: ``first_round_s`` from the start
of ``run`` to the end of round 1, ``steady_s`` the median round of rounds 3..R; ``steady_cpu_s`` is the same for
the CPU time the process used (on a loaded machine a steadier measure of the work done than wall time). Output: one
JSON line on stdout per worker.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn

WORKLOADS = {
    "standard": dict(users=10, examples=200, image=(28, 28, 1), classes=62, batch=20, local_lr=0.02,
                     weight_by_examples=True),
    "cifar10": dict(users=50, examples=50, image=(32, 32, 3), classes=10, batch=10, local_lr=0.1,
                    weight_by_examples=False),
}


class ToChannelsFirst(nn.Module):
  """NHWC -> NCHW, the first layer of pfl's benchmark CNNs (their data is channels-last)."""

  def forward(self, x):
    return x.permute(0, 3, 1, 2)


def build_model(workload: str) -> nn.Module:
  """The workload's CNN as an ``nn.Sequential`` with the ``loss``/``metrics`` methods pfl's PyTorchModel needs."""
  if workload == "standard":
    model = nn.Sequential(
        ToChannelsFirst(), nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(7 * 7 * 64, 512), nn.ReLU(), nn.Linear(512, 62))
  else:
    model = nn.Sequential(
        ToChannelsFirst(), nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(0.25), nn.Flatten(), nn.Linear(14 * 14 * 64, 128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, 10))
  for module in model.modules():  # Glorot-uniform kernels, as pfl's benchmark models and the library's zoo
    if isinstance(module, (nn.Conv2d, nn.Linear)):
      nn.init.xavier_uniform_(module.weight)
      nn.init.zeros_(module.bias)

  from pfl.metrics import Weighted

  def loss(self, inputs, targets, eval=False):
    self.eval() if eval else self.train()
    return nn.functional.cross_entropy(self(inputs), targets.long())

  @torch.no_grad()
  def metrics(self, inputs, targets, eval=True):
    self.eval() if eval else self.train()
    logits = self(inputs)
    return {"loss": Weighted(nn.functional.cross_entropy(logits, targets.long(), reduction="sum").item(),
                             len(inputs)),
            "accuracy": Weighted((logits.argmax(-1) == targets).float().sum().item(), len(inputs))}

  import types
  model.loss = types.MethodType(loss, model)
  model.metrics = types.MethodType(metrics, model)
  return model


def run(workload_name: str, rounds: int, seed: int) -> dict:
  from pfl.aggregate.simulate import SimulatedBackend
  from pfl.aggregate.weighting import WeightByDatapoints, WeightByUser
  from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
  from pfl.callback.base import TrainingProcessCallback
  from pfl.data.dataset import Dataset
  from pfl.data.federated_dataset import FederatedDataset
  from pfl.data.sampling import get_user_sampler
  from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
  from pfl.internal.ops.selector import get_default_framework_module
  from pfl.metrics import Metrics
  from pfl.model.pytorch import PyTorchModel

  workload = WORKLOADS[workload_name]
  torch.manual_seed(seed)
  rng = np.random.default_rng(seed)
  users = {}
  for user in range(workload["users"]):
    x = rng.random((workload["examples"],) + workload["image"], dtype=np.float32)
    y = rng.integers(0, workload["classes"], workload["examples"])
    users[f"user{user}"] = [torch.from_numpy(x), torch.from_numpy(y)]
  user_ids = sorted(users)
  training_data = FederatedDataset(lambda user_id: Dataset(users[user_id], user_id=user_id),
                                   get_user_sampler("minimize_reuse", user_ids))
  torch_model = build_model(workload_name)
  model = PyTorchModel(model=torch_model, local_optimizer_create=torch.optim.SGD,
                       central_optimizer=torch.optim.SGD(torch_model.parameters(), 1.0))
  weighting = WeightByDatapoints() if workload["weight_by_examples"] else WeightByUser()
  backend = SimulatedBackend(training_data=training_data, val_data=None, postprocessors=[weighting])

  marks: list[float] = []
  cpu_marks: list[float] = []

  class RoundTimer(TrainingProcessCallback):
    def on_train_begin(self, *, model):
      marks.append(time.perf_counter())
      cpu_marks.append(time.process_time())
      return Metrics()

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
      marks.append(time.perf_counter())
      cpu_marks.append(time.process_time())
      return False, Metrics()

  start, cpu_start = time.perf_counter(), time.process_time()
  FederatedAveraging().run(
      algorithm_params=NNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=10**9,
                                         train_cohort_size=workload["users"], val_cohort_size=0),
      backend=backend, model=model,
      model_train_params=NNTrainHyperParams(local_learning_rate=workload["local_lr"], local_num_epochs=1,
                                            local_batch_size=workload["batch"]),
      model_eval_params=NNEvalHyperParams(local_batch_size=1000),
      callbacks=[RoundTimer()])
  rounds_s = [b - a for a, b in zip(marks, marks[1:])]
  cpu_s = [b - a for a, b in zip(cpu_marks, cpu_marks[1:])]
  distributed = get_default_framework_module().distributed
  first_param = next(torch_model.parameters())
  return {
      "system": "pfl", "workload": workload_name, "rounds": rounds, "round_s": [round(r, 4) for r in rounds_s],
      "first_round_s": round(marks[1] - start, 3) if len(marks) > 1 else None,
      "first_round_cpu_s": round(cpu_marks[1] - cpu_start, 3) if len(cpu_marks) > 1 else None,
      "steady_s": round(statistics.median(rounds_s[2:] or rounds_s), 4),
      "cpu_round_s": [round(c, 4) for c in cpu_s],
      "steady_cpu_s": round(statistics.median(cpu_s[2:] or cpu_s), 4),
      "rank": distributed.global_rank, "workers": distributed.world_size, "torch_threads": torch.get_num_threads(),
      "param_checksum": float(first_param.detach().double().abs().sum()),
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workload", choices=sorted(WORKLOADS), default="standard")
  parser.add_argument("--rounds", type=int, default=12)
  parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  result = run(args.workload, args.rounds, args.seed)
  result.update({"torch": torch.__version__, "pfl": __import__("pfl").__version__ if hasattr(__import__("pfl"),
                                                                                           "__version__") else "0.6.0"})
  print(json.dumps(result), flush=True)  # every worker prints its own line (the driver sums their CPU time)
  return result


if __name__ == "__main__":
  sys.exit(main() and 0)
