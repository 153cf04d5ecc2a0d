"""The model zoo by name: encoders and classifiers, and `build`, the one way a model is made from
a config or a checkpoint.

A model's description is data: ``{"classifier": "single", "encoder": {"name": "tcn", ...},
"dense_size": 128, ...}``, plain values only. `build` looks both names up here and passes the
rest as keyword arguments; a name outside the registries, an unknown option or a value that is not
plain (a nested ``_target_``, an object) is one error line, and nothing else is imported or
called. Adding an encoder is one module in ``encoders/``, one entry below and one
``configs/model/<name>.yaml``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from mer_cli.core.errors import ConfigError
from mer_cli.core.registry import Registry
from mer_cli.models.encoders.inception import InceptionEncoder
from mer_cli.models.encoders.rnn import BiRNNEncoder
from mer_cli.models.encoders.tcn import TCNEncoder
from mer_cli.models.encoders.transformer import TransformerEncoder
from mer_cli.models.fusion.joint import JointClassifier
from mer_cli.models.fusion.xattn import CrossAttentionClassifier
from mer_cli.models.heads import Classifier

# model.encoder.name -> the encoder (frames, lengths -> per-frame features and a pooled vector)
ENCODERS: Registry[Callable[..., nn.Module]] = Registry("model.encoder.name")
ENCODERS.add("birnn", BiRNNEncoder)  # cell: lstm (configs/model/bilstm*.yaml) | gru (gru.yaml)
ENCODERS.add("transformer", TransformerEncoder)
ENCODERS.add("tcn", TCNEncoder)
ENCODERS.add("inception", InceptionEncoder)  # InceptionTime-style 1-D CNN (configs/model/inception.yaml)

# the classifier a modality trains (models.modalities): one stream, or one encoder per stream
CLASSIFIERS: Registry[Callable[..., nn.Module]] = Registry("classifier")
CLASSIFIERS.add("single", Classifier)
CLASSIFIERS.add("joint", JointClassifier)
CLASSIFIERS.add("xattn", CrossAttentionClassifier)

PLAIN = (bool, int, float, str, type(None))
# arguments passed by code, never by a config: the data's feature and class counts, the encoder
RUN_TIME_ARGS = ("n_features", "n_classes", "encoder")


def plain(value: Any, where: str) -> Any:
    """``value`` if it is plain data (numbers, strings, booleans, None, lists and string-keyed
    mappings of those); else ConfigError naming the key at ``where``."""
    if isinstance(value, PLAIN):
        return value
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if "_target_" in value:
            raise ConfigError(f"{where}: names a callable ({value['_target_']!r}): models are chosen by name")
        return {str(k): plain(v, f"{where}.{k}") for k, v in value.items()}
    raise ConfigError(f"{where}: {type(value).__name__} is not a plain value")


def accepted_options(factory: Callable[..., nn.Module]) -> list[str]:
    """The keyword arguments ``factory`` takes from a config: its own, and, where it passes
    ``**kwargs`` on to its base class, the base class's."""
    names: list[str] = []
    for cls in getattr(factory, "__mro__", (factory,)):
        if cls is nn.Module or cls is object:
            break
        params = inspect.signature(cls).parameters
        names += [p for p, v in params.items() if v.kind is not v.VAR_KEYWORD and p not in names]
        if not any(v.kind is v.VAR_KEYWORD for v in params.values()):
            break
    return [n for n in names if n not in RUN_TIME_ARGS]


def _options(factory: Callable[..., nn.Module], params: Mapping[str, Any], kind: str, name: str) -> None:
    accepted = accepted_options(factory)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{kind} {name!r}: unknown option {', '.join(unknown)} (it takes {', '.join(accepted)})"
        )


def build(description: Mapping[str, Any], n_features: Mapping[str, int], n_classes: int) -> nn.Module:
    """The model ``description`` names, for the data's feature counts per stream and classes
    (run-time facts, never from a config). Raises ConfigError for anything not in the zoo."""
    params = plain(description, "model")
    if not isinstance(params, dict):
        raise ConfigError(f"model: expected a mapping, not {type(params).__name__}")
    classifier_name = params.pop("classifier", "single")  # a model config alone: one stream
    classifier = CLASSIFIERS.get(classifier_name, where="model")
    encoder_params = params.pop("encoder", None)
    if not isinstance(encoder_params, dict):
        raise ConfigError("model.encoder: expected a mapping with a name (model.encoder.name)")
    encoder_name = encoder_params.pop("name", None)
    encoder = ENCODERS.get(encoder_name)
    _options(encoder, encoder_params, "model.encoder", str(encoder_name))
    _options(classifier, params, "classifier", str(classifier_name))
    try:
        return classifier(
            n_features=dict(n_features),
            n_classes=n_classes,
            encoder=functools.partial(encoder, **encoder_params),
            **params,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model ({classifier_name}, encoder {encoder_name}): {e}") from None
