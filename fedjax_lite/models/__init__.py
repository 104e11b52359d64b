"""Models: the benchmark model zoo and the layers that keep it fast inside rolled loops on XLA:CPU.

Builders (:func:`dense_softmax`, :func:`mlp`, :func:`original_fedavg_cnn`, :func:`cnn_dropout`) return a
:class:`fedjax_lite.core.model.Model`; the flax modules behind them are exported too. :class:`Conv` is a drop-in for
``flax.linen.Conv`` with canonical-layout backward convolutions (jax-ml/jax#12868), :func:`max_pool_2x2` a
``reshape + max`` pool, and :func:`non_canonical_convolutions` finds convolutions in compiled HLO that XLA:CPU will
run on its slow generic emitter.

The field's standard models: :func:`logistic_regression` (EMNIST), :func:`shakespeare_lstm` (character LSTM),
:func:`stackoverflow_lstm` (next-word prediction), :func:`stackoverflow_tag_logistic_regression` (tag prediction)
and :func:`cifar100_resnet18` (GroupNorm ResNet-18 on 24x24 crops).

A small decoder-only transformer language model, :func:`transformer_lm`, with LoRA adapters (:class:`LoRADense`) on
its projections; :func:`lora_labels` labels the adapters ``'global'`` and the pretrained base ``'frozen'``.
Pretrained weights: :func:`save_params` / :func:`load_params` (``.npz``, ``.safetensors``, orbax directories; keys
are parameter paths; every mismatch named at once). Sequence and tag models report ratio metrics
(masked token accuracy, precision, recall@5) as numerator/denominator sums: :func:`token_metrics` and
:func:`tag_metrics` turn them into the reported values.
"""

from fedjax_lite.models.adapter import from_flax
from fedjax_lite.models.conv import CANONICAL_DIMENSION_NUMBERS, Conv, conv2d_canonical
from fedjax_lite.models.hlo import CANONICAL_CONV_DIM_LABELS, convolution_instructions, non_canonical_convolutions
from fedjax_lite.models.linear import (
    TAG_RATIOS,
    MultiLabelLinear,
    logistic_regression,
    stackoverflow_tag_logistic_regression,
    tag_metrics,
)
from fedjax_lite.models.lora import LORA_PARAM_NAMES, LoRADense, is_lora_path, lora_labels
from fedjax_lite.models.pooling import max_pool, max_pool_2x2
from fedjax_lite.models.pretrained import flatten_params, load_params, read_params, save_params
from fedjax_lite.models.recurrent import LSTM, LSTMLanguageModel, shakespeare_lstm, stackoverflow_lstm
from fedjax_lite.models.resnet import ResNetGN, cifar100_resnet18, group_norm, max_pool_3x3_stride2_same
from fedjax_lite.models.sequence import (
    TOKEN_RATIOS,
    SpecialTokens,
    finalize_ratio_metrics,
    sequence_loss,
    sequence_metrics,
    token_metrics,
)
from fedjax_lite.models.transformer import (
    LORA_TARGETS,
    CausalSelfAttention,
    TransformerBlock,
    TransformerLM,
    transformer_lm,
)
from fedjax_lite.models.zoo import (
    MLP,
    CNNDropout,
    DenseSoftmax,
    OriginalFedAvgCNN,
    cnn_dropout,
    dense_softmax,
    mlp,
    original_fedavg_cnn,
)

__all__ = [
    "from_flax",
    "LORA_PARAM_NAMES",
    "LORA_TARGETS",
    "CausalSelfAttention",
    "LoRADense",
    "TransformerBlock",
    "TransformerLM",
    "flatten_params",
    "is_lora_path",
    "load_params",
    "lora_labels",
    "read_params",
    "save_params",
    "transformer_lm",
    "LSTM",
    "LSTMLanguageModel",
    "MultiLabelLinear",
    "ResNetGN",
    "SpecialTokens",
    "TAG_RATIOS",
    "TOKEN_RATIOS",
    "cifar100_resnet18",
    "finalize_ratio_metrics",
    "group_norm",
    "logistic_regression",
    "max_pool_3x3_stride2_same",
    "sequence_loss",
    "sequence_metrics",
    "shakespeare_lstm",
    "stackoverflow_lstm",
    "stackoverflow_tag_logistic_regression",
    "tag_metrics",
    "token_metrics",
    "CANONICAL_CONV_DIM_LABELS",
    "CANONICAL_DIMENSION_NUMBERS",
    "CNNDropout",
    "Conv",
    "DenseSoftmax",
    "MLP",
    "OriginalFedAvgCNN",
    "cnn_dropout",
    "conv2d_canonical",
    "convolution_instructions",
    "dense_softmax",
    "max_pool",
    "max_pool_2x2",
    "mlp",
    "non_canonical_convolutions",
    "original_fedavg_cnn",
]
