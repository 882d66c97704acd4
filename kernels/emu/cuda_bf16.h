// CPU-emulation stand-in for the CUDA header (TOFFEE_EMU builds): everything is in emu.h.
#pragma once
#include "emu.h"
