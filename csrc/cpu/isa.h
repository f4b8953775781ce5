// The instruction-set path the float32 CPU kernels (cmm, linear) take: chosen once at run time from what the CPU
// supports, and capped by cmm_force_path (tests run every path this CPU has; the benchmark compares them).
#pragma once

namespace ufb {

enum class Isa { kAvx512, kAvx2, kPortable };

// Defined in cmm_cpu.cpp, which owns the detection and the forced cap.
Isa float32_isa();

}  // namespace ufb
