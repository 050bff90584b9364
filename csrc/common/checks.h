// Input checks for op entry points (.cpp only: uses torch). Every message says what was
// expected and what came, and names the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define MAT_CHECK(cond, ...) TORCH_CHECK(cond, "mat_cuda: ", __VA_ARGS__)

#define CHECK_DEVICE(x, expected_device)                                             \
  MAT_CHECK((x).device() == (expected_device), #x " must be on ", (expected_device), \
            ", got ", (x).device())

#define CHECK_DTYPE(x, dtype)                                                        \
  MAT_CHECK((x).scalar_type() == (dtype), #x " must have dtype ", (dtype), ", got ", \
            (x).scalar_type())

#define CHECK_DIM(x, d)                                                              \
  MAT_CHECK((x).dim() == (d), #x " must have ", (d), " dimensions, got shape ",     \
            (x).sizes())

#define CHECK_CONTIGUOUS(x) \
  MAT_CHECK((x).is_contiguous(), #x " must be contiguous (got strides ", (x).strides(), ")")

#define CHECK_SHAPE(x, ...)                                                          \
  MAT_CHECK((x).sizes() == c10::IntArrayRef({__VA_ARGS__}), #x " must have shape (", \
            #__VA_ARGS__, ") = ", c10::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())
