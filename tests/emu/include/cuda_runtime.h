// Redirects the CUDA header to the emulation (tests/emu/cuda_emulation.h).
#pragma once
#include "../cuda_emulation.h"
