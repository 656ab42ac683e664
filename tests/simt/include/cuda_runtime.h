#pragma once

#include "cuda_bf16.h"
#include "simt/api.h"
