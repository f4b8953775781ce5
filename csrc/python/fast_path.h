// The Python fast path (fast_path.cpp): cmm_eager, tensor_stamp and fff_forward on the extension module.
#pragma once

#include <torch/extension.h>

namespace ufb {

void add_fast_path(pybind11::module_& m);

}  // namespace ufb
