// Every op's schema, in one place. Kernels register per device in <op>/<op>_{cpu,cuda}.*;
// fake kernels and autograd live in Python beside each wrapper (lusscore/ops/).
#include <torch/library.h>

TORCH_LIBRARY(lusscore, m) {
  // label_codec: ImageNet-S label PNG pixels (..., 3|4) uint8 -> ids R + 256*G (...) int64.
  m.def("rgb_to_label(Tensor rgb) -> Tensor");
  // overlap_gather: both views' maps (B, C, H, W) sampled on an S x S lattice spanning the
  // overlap of their crop boxes (B, 4) (left, top, width, height), x mirrored where flips.
  m.def("overlap_gather(Tensor f1, Tensor f2, Tensor boxes1, Tensor boxes2, Tensor flips1, "
        "Tensor flips2, int size, bool cell_centers) -> (Tensor g1, Tensor g2, Tensor valid)");
  m.def("overlap_gather_backward(Tensor grad_g1, Tensor grad_g2, Tensor boxes1, Tensor boxes2, "
        "Tensor flips1, Tensor flips2, SymInt height1, SymInt width1, SymInt height2, "
        "SymInt width2, int size, bool cell_centers) -> (Tensor grad_f1, Tensor grad_f2)");
  // kmeans: fused nearest-centroid search (labels int64, squared distance or similarity) and
  // deterministic per-cluster sums (K, D) fp32 + counts (K) int64.
  m.def("kmeans_assign(Tensor x, Tensor centroids, str metric) -> (Tensor, Tensor)");
  m.def("kmeans_update(Tensor x, Tensor labels, int k) -> (Tensor, Tensor)");
  // attention_pool: pooled (B,L) = mean_hw(sigmoid(a + theta) * x) for x, a (B,L,H,W), theta (L);
  // mean_attention (B,H,W) = mean_l sigmoid(a + theta) when requested (else an empty tensor).
  m.def("attention_pool(Tensor x, Tensor a, Tensor theta, bool return_mean_attention) -> "
        "(Tensor pooled, Tensor mean_attention)");
  // Its backward: (grad_x (empty unless compute_grad_x), grad_a, grad_theta), sigmoid recomputed.
  m.def("attention_pool_backward(Tensor grad_pooled, Tensor? grad_mean_attention, Tensor x, "
        "Tensor a, Tensor theta, bool compute_grad_x) -> (Tensor, Tensor, Tensor)");
  // seg_metrics: streaming ImageNet-S metrics, in-place int64 accumulators (layout in
  // csrc/seg_metrics/seg_metrics_kernel.h); pred_lut relabels predictions before the bands.
  m.def("seg_metrics_update_(Tensor pred, Tensor gt, int num_classes, int ignore_index, "
        "float boundary_ratio, Tensor? pred_lut, Tensor(a!) region_conf, "
        "Tensor(b!) boundary_conf, Tensor(c!) pred_stats, Tensor(d!) gt_hist) -> ()");
  // hp_contrastive_loss: HP's hidden-positive contrastive loss per anchor over all pairs of the
  // batch, tiled (never N x N): (loss (N), weight (N) = sum_j W_ij, lse (N): the denominator's
  // log-sum-exp, kept for the backward); semantics in csrc/hp_loss/hp_loss_kernel.h.
  m.def("hp_contrastive_loss(Tensor z, Tensor f, Tensor phi_f, Tensor s, Tensor phi_s, float tau, "
        "float rho, float lam, int seed) -> (Tensor loss, Tensor weight, Tensor lse)");
  // Its backward: grad_z, the similarity tiles and the denominator draws recomputed.
  m.def("hp_contrastive_loss_backward(Tensor grad_loss, Tensor z, Tensor f, Tensor phi_f, "
        "Tensor s, Tensor phi_s, Tensor weight, Tensor lse, float tau, float rho, float lam, "
        "int seed) -> Tensor");
  // photometric_augment: each crop's colour jitter (factors: brightness, contrast, saturation,
  // hue shift; order: the four ops' order), grayscale / invert (flags: jitter, gray, invert)
  // and blur (sigma > 0, kernel_size taps) -> float32 (N, 3, H, W) in [0, 1]. CPU only.
  m.def("photometric_augment(Tensor crops, Tensor factors, Tensor order, Tensor flags, "
        "Tensor sigma, int kernel_size) -> Tensor");
  // munkres_assign: Munkres 1.1.4 (same tie-breaking) on a cost matrix -> column of each row.
  m.def("munkres_assign(Tensor cost) -> Tensor");
}
