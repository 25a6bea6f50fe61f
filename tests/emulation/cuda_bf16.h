// Emulation stand-in for CUDA's cuda_bf16.h: found first on the include path
// when tests/emulation/build.py compiles the kernels with g++.
#pragma once
#include "cuda_emulation.h"
