#pragma once

#include <c10/util/Exception.h>

#include "../../simt/api.h"

#define C10_CUDA_CHECK(EXPR)                                                        \
  do {                                                                              \
    const cudaError_t simt_err = (EXPR);                                            \
    TORCH_CHECK(simt_err == cudaSuccess, "CUDA error: ", cudaGetErrorString(simt_err)); \
  } while (0)
