// ATen-free math of overlap_gather, shared by the CPU and CUDA kernels and mirrored by
// lusscore/reference/overlap_gather.py.
//
// Geometry of one pair (section 3.2 of the design): boxes are (left, top, width, height) in
// original-image pixels. The overlap of the two boxes is expressed in each view's [0,1]
// frame, an S x S lattice spans it (edge to edge inclusive by default: t = k / (S - 1), the
// centre t = 1/2 when S = 1; or cell centres: t = (k + 1/2) / S), x is mirrored (u -> 1 - u)
// for a flipped view, and the view is sampled bilinearly with zero padding at pixel
// u * extent - 1/2 (grid_sample's align_corners=False convention).
// The lattice is separable: row k of the output samples y at lattice point k, column k
// samples x at lattice point k, so each axis needs only S taps per view.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace lusscore {

// Where the lattice point k of S sits along the overlap, as a fraction in [0, 1].
LUSSCORE_HOST_DEVICE inline double overlap_lattice_fraction(int64_t k, int64_t size,
                                                            bool cell_centers) {
  if (cell_centers) return (static_cast<double>(k) + 0.5) / static_cast<double>(size);
  if (size == 1) return 0.5;
  return static_cast<double>(k) / static_cast<double>(size - 1);
}

// The overlap [lo, hi) of two 1-D intervals (start, length); false when it is empty or an
// input is not a number.
LUSSCORE_HOST_DEVICE inline bool overlap_interval(double start1, double len1, double start2,
                                                  double len2, double* lo, double* hi) {
  const double end1 = start1 + len1, end2 = start2 + len2;
  *lo = start1 > start2 ? start1 : start2;
  *hi = end1 < end2 ? end1 : end2;
  // NaN fails every comparison, so a NaN box is never valid.
  return len1 > 0 && len2 > 0 && start1 == start1 && start2 == start2 && *hi > *lo;
}

// Sampling position in pixels along one axis of one view for lattice point k.
LUSSCORE_HOST_DEVICE inline double overlap_sample_pixel(double view_start, double view_len,
                                                        double ov_lo, double ov_hi, int64_t k,
                                                        int64_t size, bool cell_centers,
                                                        bool mirror, int64_t extent) {
  const double lo = (ov_lo - view_start) / view_len;
  const double hi = (ov_hi - view_start) / view_len;
  double u = lo + (hi - lo) * overlap_lattice_fraction(k, size, cell_centers);
  if (mirror) u = 1.0 - u;
  return u * static_cast<double>(extent) - 0.5;
}

// The two bilinear taps of one lattice point along one axis: indices (-1 when outside the
// map: zero padding) and weights, as grid_sample forms them.
template <typename acc_t>
struct OverlapTap {
  int32_t i0, i1;
  acc_t w0, w1;
};

template <typename acc_t>
LUSSCORE_HOST_DEVICE inline OverlapTap<acc_t> overlap_make_tap(double pixel, int64_t extent) {
  const acc_t p = static_cast<acc_t>(pixel);
  const acc_t fl = ::floor(p);
  const int64_t k0 = static_cast<int64_t>(fl);
  OverlapTap<acc_t> t;
  t.w0 = (fl + acc_t(1)) - p;
  t.w1 = p - fl;
  t.i0 = (k0 >= 0 && k0 < extent) ? static_cast<int32_t>(k0) : -1;
  t.i1 = (k0 + 1 >= 0 && k0 + 1 < extent) ? static_cast<int32_t>(k0 + 1) : -1;
  return t;
}

// The empty tap (an invalid pair): contributes nothing.
template <typename acc_t>
LUSSCORE_HOST_DEVICE inline OverlapTap<acc_t> overlap_no_tap() {
  OverlapTap<acc_t> t;
  t.i0 = -1;
  t.i1 = -1;
  t.w0 = acc_t(0);
  t.w1 = acc_t(0);
  return t;
}

// Whether pair b overlaps. boxes are (B, 4) rows (left, top, width, height).
LUSSCORE_HOST_DEVICE inline bool overlap_pair_valid(const double* box1, const double* box2) {
  double lo, hi;
  return overlap_interval(box1[0], box1[2], box2[0], box2[2], &lo, &hi) &&
         overlap_interval(box1[1], box1[3], box2[1], box2[3], &lo, &hi);
}

// Tap of lattice point k along `axis` (0 = x, 1 = y) of view `view` (0 or 1) of one pair.
// extent is W for x and H for y of that view's map.
template <typename acc_t>
LUSSCORE_HOST_DEVICE inline OverlapTap<acc_t> overlap_axis_tap(const double* box1,
                                                               const double* box2, bool flip,
                                                               int view, int axis, int64_t k,
                                                               int64_t size, bool cell_centers,
                                                               int64_t extent) {
  if (!overlap_pair_valid(box1, box2)) return overlap_no_tap<acc_t>();
  // Selects with constant indices only (a run-time index would put the boxes in local memory).
  const bool x = axis == 0;
  const double start1 = x ? box1[0] : box1[1], len1 = x ? box1[2] : box1[3];
  const double start2 = x ? box2[0] : box2[1], len2 = x ? box2[2] : box2[3];
  double lo, hi;
  overlap_interval(start1, len1, start2, len2, &lo, &hi);
  const double pixel = overlap_sample_pixel(view == 0 ? start1 : start2, view == 0 ? len1 : len2,
                                            lo, hi, k, size, cell_centers, flip && x, extent);
  return overlap_make_tap<acc_t>(pixel, extent);
}

// Weight of tap table entry t on map index m (0 when t does not touch m).
template <typename acc_t>
LUSSCORE_HOST_DEVICE inline acc_t overlap_tap_weight(const OverlapTap<acc_t>& t, int64_t m) {
  return t.i0 == m ? t.w0 : (t.i1 == m ? t.w1 : acc_t(0));
}

// Reads a flip flag stored as bool/uint8 (1 byte), int32 (4) or int64 (8).
LUSSCORE_HOST_DEVICE inline bool overlap_load_flag(const void* flags, int elem_size, int64_t b) {
  if (elem_size == 1) return static_cast<const uint8_t*>(flags)[b] != 0;
  if (elem_size == 4) return static_cast<const int32_t*>(flags)[b] != 0;
  return static_cast<const int64_t*>(flags)[b] != 0;
}

// Reads box row b as doubles from float32 or float64 storage.
LUSSCORE_HOST_DEVICE inline void overlap_load_box(const void* boxes, bool is_double, int64_t b,
                                                  double* out) {
  for (int k = 0; k < 4; ++k) {
    out[k] = is_double ? static_cast<const double*>(boxes)[b * 4 + k]
                       : static_cast<double>(static_cast<const float*>(boxes)[b * 4 + k]);
  }
}

// Everything the kernels need to know about the pairs' geometry (plain data: passed by value
// to CUDA kernels). boxes: (B, 4) contiguous float32 or float64; flips: (B) of 1, 4 or 8 bytes.
struct OverlapGeometry {
  const void* boxes1;
  const void* boxes2;
  const void* flips1;
  const void* flips2;
  bool boxes1_double, boxes2_double;
  int flips1_bytes, flips2_bytes;
  int64_t size;
  bool cell_centers;
};

LUSSCORE_HOST_DEVICE inline bool overlap_geometry_valid(const OverlapGeometry& geo, int64_t b) {
  double box1[4], box2[4];
  overlap_load_box(geo.boxes1, geo.boxes1_double, b, box1);
  overlap_load_box(geo.boxes2, geo.boxes2_double, b, box2);
  return overlap_pair_valid(box1, box2);
}

// Tap of lattice point k along axis (0 = x over width, 1 = y over height) of view 0 or 1.
template <typename acc_t>
LUSSCORE_HOST_DEVICE inline OverlapTap<acc_t> overlap_geometry_tap(const OverlapGeometry& geo,
                                                                   int64_t b, int view,
                                                                   int axis, int64_t k,
                                                                   int64_t extent) {
  double box1[4], box2[4];
  overlap_load_box(geo.boxes1, geo.boxes1_double, b, box1);
  overlap_load_box(geo.boxes2, geo.boxes2_double, b, box2);
  const bool flip = view == 0 ? overlap_load_flag(geo.flips1, geo.flips1_bytes, b)
                              : overlap_load_flag(geo.flips2, geo.flips2_bytes, b);
  return overlap_axis_tap<acc_t>(box1, box2, flip, view, axis, k, geo.size, geo.cell_centers,
                                 extent);
}

// Whether tap t touches map index m.
template <typename acc_t>
LUSSCORE_HOST_DEVICE inline bool overlap_tap_touches(const OverlapTap<acc_t>& t, int64_t m) {
  return t.i0 == m || t.i1 == m;
}

}  // namespace lusscore
