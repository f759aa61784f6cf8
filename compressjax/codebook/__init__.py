"""Weight sharing: k-means codebooks with trainable centroids (Deep Compression's second stage).

Each selected kernel is replaced by a :class:`Codebook`: one small integer index per weight (packed at its
bit width) into a table of ``2^bits`` shared float values, the centroids, found by k-means. The codebook
is shared by the whole kernel or, with ``per_channel=True``, each output channel (the last axis, as for
:class:`~compressjax.QuantSpec`'s default ``channel_axes=(-1,)``) has its own.

k-means in one dimension is cheap when done right: the values of each codebook are sorted once and their
(weighted) prefix sums taken once; a Lloyd iteration then only needs the ``2^bits - 1`` decision
boundaries (midpoints between sorted centroids), located with ``searchsorted``, and the cluster means read
off the prefix sums, ``O(2^bits log n)`` per codebook instead of ``O(n 2^bits)``. All codebooks of a kernel
iterate together in one ``lax.while_loop`` (vectorised, no Python loop per channel) until no assignment
changes or ``iterations`` is reached.

Training the centroids (the paper's fine-tuning: the gradient of a shared value is the sum of the
gradients of the weights that share it) needs no custom rule: :meth:`Codebook.decode` is a ``jnp.take``,
whose transpose is a scatter-add. :func:`split_centroids` / :func:`merge_centroids` give optax a tree of
float centroids only (integer indices never see an optimizer), :func:`codebook_student` is the
``student_transform`` of :func:`~compressjax.make_distill_step`, and :func:`reassign_indices` optionally
moves each weight to the nearest updated centroid afterwards.

References:
    Han, Mao & Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning, Trained
    Quantization and Huffman Coding", ICLR 2016, https://arxiv.org/abs/1510.00149
    Kim et al., "SqueezeLLM: Dense-and-Sparse Quantization", ICML 2024, https://arxiv.org/abs/2306.07629
    (sensitivity-weighted k-means, the ``weights=`` argument).
    Lloyd, "Least squares quantization in PCM", IEEE Trans. Inf. Theory 28(2), 1982.
"""


from compressjax.codebook._codebook import (
    DEFAULT_ITERATIONS,
    INITS,
    Codebook,
    is_codebook,
)
from compressjax.codebook._feedback import codebook_error_feedback, refit_centroids
from compressjax.codebook._kmeans import kmeans_codebooks
from compressjax.codebook._train import (
    cast_centroids,
    codebook_student,
    decode_params,
    merge_centroids,
    reassign_indices,
    split_centroids,
)

__all__ = [
    "Codebook",
    "kmeans_codebooks",
    "decode_params",
    "split_centroids",
    "merge_centroids",
    "codebook_student",
    "reassign_indices",
    "cast_centroids",
    "codebook_error_feedback",
    "refit_centroids",
    "is_codebook",
    "INITS",
    "DEFAULT_ITERATIONS",
]

