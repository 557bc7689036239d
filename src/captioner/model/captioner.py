"""The captioning model: image regions -> projected memory -> Transformer decoder with cross-attention.

Why a Transformer decoder rather than a Show-Attend-Tell LSTM: on 2 CPU cores the whole caption is
trained in one parallel pass (teacher forcing), several times faster per epoch than a step-by-step
RNN, which buys the epochs and regularisation that decide BLEU here (see BENCHMARKS.md). Cross-
attention gives the per-word attention maps over the image regions that Show-Attend-Tell has.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from captioner.config import ModelConfig
from captioner.constants import PAD_ID
from captioner.model.layers import DecoderLayer, EncoderLayer, sinusoid

# Decoding positions a state holds when no length is given; the export's default cache size
# (``export.max_decode_length``) and the gateway's default MAX_CAPTION_LENGTH are the same 40.
DEFAULT_MAX_DECODE_LENGTH = 40


class CaptionModel(keras.Model):
    def __init__(self, vocab_size: int, num_regions: int, feature_dim: int, cfg: ModelConfig,
                 dtype_policy: str | None = None, **kwargs):
        super().__init__(dtype=dtype_policy, **kwargs)
        self.vocab_size, self.num_regions, self.feature_dim = vocab_size, num_regions, feature_dim
        self.cfg = cfg
        d = cfg.d_model
        self.num_layers = cfg.num_layers
        self.feature_drop = keras.layers.Dropout(cfg.feature_dropout, noise_shape=None, name="feature_dropout")
        self.project = keras.layers.Dense(d, name="project")
        self.region_position = keras.layers.Embedding(num_regions, d, name="region_position")
        self.encoders = [EncoderLayer(d, cfg.num_heads, cfg.ff_dim, cfg.dropout, name=f"encoder_{i}")
                         for i in range(cfg.encoder_layers)]
        self.memory_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="memory_norm")
        self.embed = keras.layers.Embedding(vocab_size, d, name="embed")
        self.embed_drop = keras.layers.Dropout(cfg.dropout)
        self.decoders = [DecoderLayer(d, cfg.num_heads, cfg.ff_dim, cfg.dropout, name=f"decoder_{i}")
                         for i in range(cfg.num_layers)]
        self.final_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")
        if not cfg.tie_embeddings:
            self.output_layer = keras.layers.Dense(vocab_size, name="logits")
        self.output_bias = self.add_weight(shape=(vocab_size,), initializer="zeros", name="output_bias")

    # -- encoder ---------------------------------------------------------------------------------
    def encode(self, features, training=False):
        """Backbone features ``[B, N, C]`` -> memory ``[B, N, d]``."""
        x = tf.cast(features, self.compute_dtype)
        x = self.feature_drop(x, training=training)
        x = self.project(x) + self.region_position(tf.range(self.num_regions))[None]
        for layer in self.encoders:
            x = layer(x, training=training)
        return self.memory_norm(x)

    # -- decoder ---------------------------------------------------------------------------------
    def _embed(self, tokens, start: int | tf.Tensor = 0):
        x = self.embed(tokens) * tf.cast(tf.sqrt(float(self.cfg.d_model)), self.compute_dtype)
        positions = tf.range(tf.shape(tokens)[1]) + start
        return x + sinusoid(positions, self.cfg.d_model, self.compute_dtype)[None]

    def _logits(self, x):
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            # One 2-D product over all positions: a batched [B, T, d] x [d, V] product broadcasts the
            # table, and its gradient then builds a [B, d, V] tensor per batch to sum it (measured: a
            # third of an SCST update, the largest op of a cross-entropy step).
            flat = tf.reshape(x, [-1, self.cfg.d_model])
            logits = tf.matmul(flat, tf.cast(self.embed.embeddings, x.dtype), transpose_b=True)
            logits = tf.reshape(logits, tf.concat([tf.shape(x)[:-1], [self.vocab_size]], axis=0))
        else:
            logits = self.output_layer(x)
        return tf.cast(logits, tf.float32) + tf.cast(self.output_bias, tf.float32)

    def decode(self, memory, tokens, training=False, return_attention=False, memory_rows=None):
        """Teacher forcing: ``tokens [B, T]`` -> logits ``[B, T, V]`` (and attention ``[B, T, N]``).

        ``memory_rows [B]``: when several captions share an image (SCST's samples, cross-entropy
        batches grouped by image), ``memory`` holds one row per image and ``memory_rows`` names
        each caption's row. Every layer then projects an image's cross-attention keys/values once
        and gathers them, instead of once per caption: the same values for less arithmetic (the
        projections are about half of an SCST update's)."""
        length = tf.shape(tokens)[1]
        causal = tf.linalg.band_part(tf.ones([length, length]), -1, 0)[None, None]
        x = self.embed_drop(self._embed(tokens), training=training)
        attention = None
        for layer in self.decoders:
            cross = None
            if memory_rows is not None:
                cross = tuple(tf.gather(t, memory_rows) for t in layer.cross_attn.project_kv(memory))
            x, attention = layer(x, memory, causal, training=training, cross=cross)
        logits = self._logits(x)
        return (logits, attention) if return_attention else logits

    def call(self, inputs, training=False):
        """``(features [B, N, C], tokens [B, T])``, or with a third element ``image_ids [B]`` (rows of
        one image carry the same id and the same features): each image is then encoded once."""
        if len(inputs) == 2:
            features, tokens = inputs
            return self.decode(self.encode(features, training=training), tokens, training=training)
        features, tokens, image_ids = inputs
        _, rows = tf.unique(tf.reshape(image_ids, [-1]))
        count = tf.reduce_max(rows) + 1
        first = tf.math.unsorted_segment_min(tf.range(tf.shape(rows)[0]), rows, count)
        memory = self.encode(tf.gather(features, first), training=training)
        return self.decode(memory, tokens, training=training, memory_rows=rows)

    # -- one decoding step ----------------------------------------------------------------------
    def cross_memory(self, memory):
        """Every decoder layer's cross-attention keys and values of the image, computed once per
        image instead of once per generated word: ``memory [B, N, d]`` -> ``[B, N, 2 * layers * d]``."""
        return tf.concat([layer.cross_attn.kv(memory) for layer in self.decoders], axis=-1)

    def split_cross(self, cross):
        """``cross_memory``'s ``[B, N, 2L * d]`` split into every layer's heads at once:
        ``[2L, B, heads, N, head_dim]``. ``step`` takes either; a decoding loop that splits once
        saves a copy of every image's keys/values at every step (a fifth of SCST's sampling time)."""
        d, heads = self.cfg.d_model, self.cfg.num_heads
        shape = [tf.shape(cross)[0], tf.shape(cross)[1], 2 * len(self.decoders), heads, d // heads]
        return tf.transpose(tf.reshape(tf.cast(cross, self.compute_dtype), shape), [2, 0, 3, 1, 4])

    def initial_state(self, batch_size, max_length: int | None = None):
        """Empty self-attention cache ``[B, 2 * layers, max_length, d]``: keys and values of every
        layer, one slot per decoding position. Its size is fixed, so every decoding step (and every
        request TF Serving merges into one batch) has the same state shape."""
        slots = DEFAULT_MAX_DECODE_LENGTH if max_length is None else max_length
        return tf.zeros([batch_size, 2 * self.num_layers, slots, self.cfg.d_model], self.compute_dtype)

    def step(self, cross, tokens, state, position=None):
        """One position. ``cross`` is ``cross_memory(memory)`` (or ``split_cross`` of it);
        ``tokens [B]`` sit at ``position`` (a scalar, or ``[B]`` with one position per row; None
        means 0, the first step) in the cache ``state [B, 2L, T, d]`` from ``initial_state``.
        Returns ``(log_probs [B, V], attention [B, N], state [B, 2L, T, d])``."""
        d = self.cfg.d_model
        slots = tf.shape(state)[2]
        position = tf.convert_to_tensor(0 if position is None else position, tf.int32)
        checks = [tf.debugging.assert_less(tf.reduce_max(position), slots, message=(
                      "decode position is past the state's cache size (the export's max_decode_length)")),
                  tf.debugging.assert_non_negative(position, message="decode position must be >= 0")]
        with tf.control_dependencies(checks):
            position = tf.identity(position)
        x = self.embed(tokens[:, None]) * tf.cast(tf.sqrt(float(d)), self.compute_dtype)
        x += sinusoid(tf.reshape(position, [-1]), d, self.compute_dtype)[:, None]
        # The step is bound by moving the state through memory (issue #11), so the full state is
        # read once and written once: the layers see only the prefix up to the furthest row's
        # position (all they attend to; the same arithmetic as on the whole cache), and the output
        # is the input with each row's new keys/values scattered into its slot (a copy plus a
        # small update; cheaper than a masked select or a concat, measured).
        state = tf.convert_to_tensor(state)
        batch = tf.shape(state)[0]
        rows = tf.broadcast_to(tf.reshape(position, [-1]), [batch])                 # [B]
        visible = tf.reduce_max(position) + 1
        pairs = 2 * len(self.decoders)
        # The image's keys/values ([B, N, 2L*d], as encode exports them) split into every layer's
        # heads at once: [2L, B, heads, N, head_dim], each layer's a view of one contiguous block.
        if cross.shape.rank != 5:
            cross = self.split_cross(cross)
        written, attention = [], None
        for i, layer in enumerate(self.decoders):
            caches = [tf.cast(state[:, j, :visible], self.compute_dtype) for j in (2 * i, 2 * i + 1)]
            x, attention, k_new, v_new = layer.step(x, cross[2 * i], cross[2 * i + 1], *caches, position)
            written += [tf.gather(k_new, rows, axis=1, batch_dims=1), tf.gather(v_new, rows, axis=1, batch_dims=1)]
        log_probs = tf.nn.log_softmax(self._logits(x)[:, 0], axis=-1)
        # The state keeps its dtype (float32 in the export, whose signature takes and returns
        # float32): under mixed precision the new keys/values are float16 values either way, and
        # casting the whole state to float16 and back would move it twice more.
        slots_of = (tf.range(batch)[:, None] * pairs + tf.range(pairs)[None]) * slots + rows[:, None]  # [B, 2L]
        flat = tf.tensor_scatter_nd_update(tf.reshape(state, [-1, d]), tf.reshape(slots_of, [-1, 1]),
                                           tf.cast(tf.reshape(tf.stack(written, axis=1), [-1, d]), state.dtype))
        return log_probs, attention[:, 0], tf.reshape(flat, tf.shape(state))

    def build_all(self):
        """Create every weight by running one tiny batch (needed before loading weights)."""
        features = tf.zeros([1, self.num_regions, self.feature_dim])
        self((features, tf.fill([1, 2], PAD_ID)))
        return self


def build_model(vocab_size: int, num_regions: int, feature_dim: int, cfg: ModelConfig,
                mixed_precision: bool = False) -> CaptionModel:
    policy = "mixed_float16" if mixed_precision else None
    return CaptionModel(vocab_size, num_regions, feature_dim, cfg, dtype_policy=policy).build_all()
