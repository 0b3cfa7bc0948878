// Argument checks of seg_metrics_update_, shared by both devices.
#pragma once

#include "common/checks.h"
#include "seg_metrics/seg_metrics_kernel.h"

namespace lusscore {

struct SegMetricsShape {
  int64_t batch, height, width;
  int64_t rows;  // R: predicted ids 0..R-1 have their own row, row R holds the others
};

inline SegMetricsShape seg_metrics_check(const at::Tensor& pred, const at::Tensor& gt,
                                         int64_t num_classes, double boundary_ratio,
                                         const c10::optional<at::Tensor>& pred_lut,
                                         const at::Tensor& region_conf,
                                         const at::Tensor& boundary_conf,
                                         const at::Tensor& pred_stats, const at::Tensor& gt_hist) {
  TORCH_CHECK(num_classes >= 1, "num_classes must be >= 1, got ", num_classes);
  TORCH_CHECK(boundary_ratio >= 0, "boundary_ratio must be >= 0, got ", boundary_ratio);
  TORCH_CHECK(pred.dim() == 2 || pred.dim() == 3,
              "pred must be one (H, W) label map or a batch (B, H, W), got shape ", pred.sizes());
  TORCH_CHECK(pred.sizes() == gt.sizes(), "pred and gt must have the same shape, got ",
              pred.sizes(), " and ", gt.sizes());
  // Every integer dtype: uint8, int8, int16, int32, int64, uint16, uint32, uint64, on both
  // devices. Ids are compared as int64 (a uint64 id >= 2^63 wraps to a negative id).
  for (const at::Tensor* t : {&pred, &gt}) {
    TORCH_CHECK(at::isIntegralType(t->scalar_type(), /*includeBool=*/false),
                (t == &pred ? "pred" : "gt"), " must hold integer label ids, got dtype ",
                t->scalar_type());
  }
  check_same_device(pred, gt, "pred", "gt");
  const int64_t batch = pred.dim() == 3 ? pred.size(0) : 1;
  const int64_t c1 = num_classes + 1;
  TORCH_CHECK(region_conf.dim() == 3 && region_conf.size(0) == seg::kNumSets &&
                  region_conf.size(1) >= c1 + 1 && region_conf.size(2) == c1,
              "region_conf must have shape (5, R+1, num_classes+1) with R >= num_classes+1, got ",
              region_conf.sizes());
  const int64_t rows = region_conf.size(1) - 1;
  TORCH_CHECK(boundary_conf.dim() == 3 && boundary_conf.size(0) == seg::kNumSets &&
                  boundary_conf.size(1) == rows + 1 && boundary_conf.size(2) == c1 + 1,
              "boundary_conf must have shape (5, ", rows + 1, ", ", c1 + 1, "), got ",
              boundary_conf.sizes());
  TORCH_CHECK(pred_stats.dim() == 3 && pred_stats.size(0) == batch && pred_stats.size(1) == 2 &&
                  pred_stats.size(2) == rows + 1,
              "pred_stats must have shape (", batch, ", 2, ", rows + 1, "), got ",
              pred_stats.sizes());
  TORCH_CHECK(gt_hist.dim() == 2 && gt_hist.size(0) == batch && gt_hist.size(1) == c1 + 1,
              "gt_hist must have shape (", batch, ", ", c1 + 1, "), got ", gt_hist.sizes());
  const std::pair<const at::Tensor*, const char*> outs[] = {
      {&region_conf, "region_conf"}, {&boundary_conf, "boundary_conf"},
      {&pred_stats, "pred_stats"}, {&gt_hist, "gt_hist"}};
  for (const auto& [t, name] : outs) {
    check_dtype(*t, {at::kLong}, name);
    TORCH_CHECK(t->is_contiguous(), name, " must be contiguous");
    check_same_device(pred, *t, "pred", name);
  }
  if (pred_lut.has_value()) {
    check_dtype(*pred_lut, {at::kLong}, "pred_lut");
    check_dim(*pred_lut, 1, "pred_lut");
    check_same_device(pred, *pred_lut, "pred", "pred_lut");
  }
  return {batch, pred.size(-2), pred.size(-1), rows};
}

// pred and gt as (B, H, W) contiguous tensors of one integer dtype (int64 when they differ).
inline std::pair<at::Tensor, at::Tensor> seg_metrics_inputs(const at::Tensor& pred,
                                                            const at::Tensor& gt) {
  at::Tensor p = pred.dim() == 2 ? pred.unsqueeze(0) : pred;
  at::Tensor g = gt.dim() == 2 ? gt.unsqueeze(0) : gt;
  if (p.scalar_type() != g.scalar_type()) {
    p = p.to(at::kLong);
    g = g.to(at::kLong);
  }
  return {p.contiguous(), g.contiguous()};
}

}  // namespace lusscore
