// Emulated CUB (see ../../cub_emu.h).
#pragma once
#include "../../cub_emu.h"
