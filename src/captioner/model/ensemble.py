"""Several trained caption models decoded as one (issue #9: ensembles of checkpoints or seeds).

``EnsembleModel`` has the interface the decoders and the export use (``encode``, ``cross_memory``,
``initial_state``, ``step``, ``num_regions``, ``num_layers``, ``cfg.d_model``, ``weights``), so greedy
and beam search, the library's evaluation and the SavedModel (``serving_default``, ``encode``,
``decode_step``) work on it unchanged. Each step, the members' next-word distributions are combined:

* ``"prob"`` (default): the mean of the members' probabilities, ``log(mean_i p_i)``, a mixture as
  the self-critical code bases' ensembles use;
* ``"log_prob"``: the mean of their log-probabilities, renormalised (a product of experts).

The members share the vocabulary and the image features (same backbone); each keeps its own decoder
state. Packing: memory and cross-attention features are the members' concatenated on the last axis,
the decode state on its layer axis (``[B, 2 * sum(layers), T, d]``), so all members need the same
``d_model``; the export's fixed-size state then has ``num_layers = sum(layers)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import tensorflow as tf

COMBINE_RULES = ("prob", "log_prob")


@dataclass(frozen=True)
class _Dims:
    d_model: int


class EnsembleModel:
    def __init__(self, members: Sequence, combine: str = "prob"):
        from captioner.errors import ConfigError

        members = list(members)
        if not members:
            raise ConfigError("an ensemble needs at least one member", field="members")
        if combine not in COMBINE_RULES:
            raise ConfigError(f"combine must be one of {COMBINE_RULES}, got {combine!r}", field="combine")
        first = members[0]
        for i, member in enumerate(members[1:], start=1):
            for attr in ("vocab_size", "num_regions", "feature_dim"):
                if getattr(member, attr) != getattr(first, attr):
                    raise ConfigError(f"member {i} has {attr} {getattr(member, attr)}, member 0 has "
                                      f"{getattr(first, attr)}: members must share vocabulary and features",
                                      field=f"members[{i}]")
            if member.cfg.d_model != first.cfg.d_model:
                raise ConfigError(f"member {i} has d_model {member.cfg.d_model}, member 0 has {first.cfg.d_model}: "
                                  f"the packed decode state needs one d_model", field=f"members[{i}]")
        self.members, self.combine = members, combine
        self.vocab_size, self.num_regions, self.feature_dim = first.vocab_size, first.num_regions, first.feature_dim
        self.cfg = _Dims(first.cfg.d_model)
        self.num_layers = sum(m.num_layers for m in members)
        self.compute_dtype = "float32"

    @property
    def weights(self) -> list:
        return [w for m in self.members for w in m.weights]

    def _split(self, x, sizes: list[int], axis: int) -> list:
        return tf.split(x, sizes, axis=axis) if len(sizes) > 1 else [x]

    def encode(self, features, training=False):
        """Features ``[B, N, C]`` -> the members' memories, concatenated: ``[B, N, members * d]``."""
        return tf.concat([tf.cast(m.encode(features, training=training), tf.float32) for m in self.members], -1)

    def cross_memory(self, memory):
        d = self.cfg.d_model
        pieces = self._split(memory, [d] * len(self.members), -1)
        return tf.concat([tf.cast(m.cross_memory(p), tf.float32) for m, p in zip(self.members, pieces, strict=True)],
                         -1)

    def initial_state(self, batch_size, max_length: int | None = None):
        return tf.concat([tf.cast(m.initial_state(batch_size, max_length), tf.float32) for m in self.members], 1)

    def step(self, cross, tokens, state, position=None):
        d = self.cfg.d_model
        crosses = self._split(cross, [2 * m.num_layers * d for m in self.members], -1)
        states = self._split(state, [2 * m.num_layers for m in self.members], 1)
        log_probs, attention, new_states = [], [], []
        for member, c, s in zip(self.members, crosses, states, strict=True):
            lp, att, st = member.step(c, tokens, s, position)
            log_probs.append(tf.cast(lp, tf.float32))
            attention.append(tf.cast(att, tf.float32))
            new_states.append(tf.cast(st, tf.float32))
        stacked = tf.stack(log_probs)
        if self.combine == "prob":
            combined = tf.reduce_logsumexp(stacked, axis=0) - math.log(len(self.members))
        else:
            combined = tf.nn.log_softmax(tf.reduce_mean(stacked, axis=0), axis=-1)
        return combined, tf.reduce_mean(tf.stack(attention), axis=0), tf.concat(new_states, 1)
