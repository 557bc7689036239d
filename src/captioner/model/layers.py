"""Transformer layers with an explicit key/value cache for step-wise decoding.

Written out (instead of ``keras.layers.MultiHeadAttention``) so that one decoding step can take and
return the self-attention cache as a plain tensor: that tensor is the ``state`` of the exported
``decode_step`` signature, which lets a gateway run beam search over TF Serving.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf


def sinusoid(positions, dim: int, dtype=tf.float32):
    """Sinusoidal position encodings for integer ``positions`` ``[T]`` -> ``[T, dim]``."""
    positions = tf.cast(positions, tf.float32)[:, None]
    rates = tf.exp(-math.log(10000.0) * tf.range(0, dim, 2, dtype=tf.float32) / dim)[None, :]
    angles = positions * rates
    enc = tf.stack([tf.sin(angles), tf.cos(angles)], axis=-1)
    return tf.cast(tf.reshape(enc, [-1, dim]), dtype)


class Attention(keras.layers.Layer):
    """Multi-head scaled dot-product attention; returns head-averaged weights too."""

    def __init__(self, d_model: int, num_heads: int, dropout: float, **kwargs):
        super().__init__(**kwargs)
        self.d_model, self.num_heads = d_model, num_heads
        self.head_dim = d_model // num_heads
        self.q = keras.layers.Dense(d_model, name="q")
        self.kv = keras.layers.Dense(2 * d_model, name="kv")
        self.o = keras.layers.Dense(d_model, name="o")
        self.drop = keras.layers.Dropout(dropout)

    def _heads(self, x):
        b, t = tf.shape(x)[0], tf.shape(x)[1]
        return tf.transpose(tf.reshape(x, [b, t, self.num_heads, self.head_dim]), [0, 2, 1, 3])

    def project_kv(self, source):
        k, v = tf.split(self.kv(source), 2, axis=-1)
        return k, v

    def attend(self, x, k, v, mask=None, training=False):
        """``k``/``v``: ``[B, S, d]``, or already split into heads, ``[B, heads, S, head_dim]``."""
        q = self._heads(self.q(x))
        kh, vh = (k, v) if k.shape.rank == 4 else (self._heads(k), self._heads(v))
        scores = tf.einsum("bhqd,bhkd->bhqk", q, kh) / math.sqrt(self.head_dim)
        scores = tf.cast(scores, tf.float32)
        if mask is not None:
            scores += (1.0 - tf.cast(mask, tf.float32)) * -1e9
        weights = tf.nn.softmax(scores, axis=-1)
        probs = self.drop(tf.cast(weights, self.compute_dtype), training=training)
        out = tf.einsum("bhqk,bhkd->bhqd", probs, vh)
        b, t = tf.shape(x)[0], tf.shape(x)[1]
        out = tf.reshape(tf.transpose(out, [0, 2, 1, 3]), [b, t, self.d_model])
        return self.o(out), tf.reduce_mean(weights, axis=1)

    def call(self, x, source, attn_mask=None, training=False):
        k, v = self.project_kv(source)
        return self.attend(x, k, v, attn_mask, training)


class FeedForward(keras.layers.Layer):
    def __init__(self, d_model: int, ff_dim: int, dropout: float, **kwargs):
        super().__init__(**kwargs)
        self.up = keras.layers.Dense(ff_dim, activation="gelu", name="up")
        self.down = keras.layers.Dense(d_model, name="down")
        self.drop = keras.layers.Dropout(dropout)

    def call(self, x, training=False):
        return self.drop(self.down(self.drop(self.up(x), training=training)), training=training)


class EncoderLayer(keras.layers.Layer):
    """Pre-norm self-attention over the image regions."""

    def __init__(self, d_model: int, num_heads: int, ff_dim: int, dropout: float, **kwargs):
        super().__init__(**kwargs)
        self.norm1 = keras.layers.LayerNormalization(epsilon=1e-5)
        self.attn = Attention(d_model, num_heads, dropout, name="self_attention")
        self.norm2 = keras.layers.LayerNormalization(epsilon=1e-5)
        self.ff = FeedForward(d_model, ff_dim, dropout, name="ff")
        self.drop = keras.layers.Dropout(dropout)

    def call(self, x, training=False):
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, h, training=training)[0], training=training)
        return x + self.ff(self.norm2(x), training=training)


class DecoderLayer(keras.layers.Layer):
    """Pre-norm causal self-attention, cross-attention to the image, feed-forward."""

    def __init__(self, d_model: int, num_heads: int, ff_dim: int, dropout: float, **kwargs):
        super().__init__(**kwargs)
        self.norm1 = keras.layers.LayerNormalization(epsilon=1e-5)
        self.self_attn = Attention(d_model, num_heads, dropout, name="self_attention")
        self.norm2 = keras.layers.LayerNormalization(epsilon=1e-5)
        self.cross_attn = Attention(d_model, num_heads, dropout, name="cross_attention")
        self.norm3 = keras.layers.LayerNormalization(epsilon=1e-5)
        self.ff = FeedForward(d_model, ff_dim, dropout, name="ff")
        self.drop = keras.layers.Dropout(dropout)

    def call(self, x, memory, self_mask, training=False, cross=None):
        """Whole sequence (teacher forcing): ``x [B,T,d]`` -> ``(x, cross attention [B,T,N])``.
        ``cross``: the image's cross-attention ``(keys, values)`` ``[B,N,d]`` if already projected
        (``memory`` is then not read)."""
        h = self.norm1(x)
        x = x + self.drop(self.self_attn(h, h, attn_mask=self_mask, training=training)[0], training=training)
        if cross is None:
            h, attention = self.cross_attn(self.norm2(x), memory, training=training)
        else:
            h, attention = self.cross_attn.attend(self.norm2(x), *cross, training=training)
        x = x + self.drop(h, training=training)
        return x + self.ff(self.norm3(x), training=training), attention

    def step(self, x, cross_k, cross_v, k_cache, v_cache, position):
        """One position: ``x [B,1,d]``, the image's precomputed cross-attention keys/values ``[B,N,d]``
        (or already split into heads, ``[B,heads,N,head_dim]``),
        the fixed-size self-attention caches ``[B,T,d]`` and the position of ``x`` (scalar or ``[B]``,
        one per row) -> ``(x, attention [B,1,N], k_cache, v_cache)``.

        The new key/value is written into slot ``position`` and only slots ``<= position`` are
        attended to. The cache keeps its size, so rows at different positions (requests merged by
        TF Serving's batching) fit in one tensor. The caches may be cut after the furthest row's
        slot (``T = max(position) + 1``, what ``CaptionModel.step`` passes): nothing past it is read,
        so the result is the same, and the layer moves only that prefix."""
        h = self.norm1(x)
        k, v = self.self_attn.project_kv(h)
        batch = tf.shape(k_cache)[0]
        rows = tf.reshape(position, [-1, 1])                                   # [B or 1, 1]
        # Each row's slot is overwritten by a scatter (the same values a masked tf.where writes, but
        # a broadcasting select is several times slower on CPU, and the step is bound by such moves).
        slot = tf.stack([tf.range(batch), tf.broadcast_to(rows[:, 0], [batch])], axis=1)   # [B, 2]
        k_cache = tf.tensor_scatter_nd_update(k_cache, slot, k[:, 0])
        v_cache = tf.tensor_scatter_nd_update(v_cache, slot, v[:, 0])
        # Attend over the written prefix only: slots past the furthest row's position are all
        # masked, and leaving them out keeps the arithmetic (and so the captions) the same whatever
        # the cache size.
        visible = tf.reduce_max(position) + 1
        mask = tf.range(visible)[None] <= rows                                 # [B or 1, visible]
        x = x + self.self_attn.attend(h, k_cache[:, :visible], v_cache[:, :visible], mask[:, None, None])[0]
        # Keys/values may come already split into heads ([B, heads, N, head_dim]): CaptionModel.step
        # splits every layer's in one transpose instead of a slice and a transpose per layer and step.
        h, attention = self.cross_attn.attend(self.norm2(x), cross_k, cross_v)
        x = x + h
        return x + self.ff(self.norm3(x)), attention, k_cache, v_cache
