// The Python fast path: bare CPython functions (METH_FASTCALL) for the calls the serving path makes per layer and
// per batch, where pybind11's argument conversion or the dispatcher would cost as much as the kernel on one token
// (docs/kernel.md). cmm_eager, linear_eager and attention_eager are torch.ops.ufb.cmm, .linear and
// .varlen_attention without the dispatcher; tensor_stamp is engine.derived's staleness check; fff_forward is
// engine.fff.FFF.forward's serving case, which reads the module's attributes (the names below) and must change with
// them. Each falls back to Python (NotImplemented) where unsure.
#include "python/fast_path.h"

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstring>
#include <utility>

#include "cpu/attention_op.h"
#include "cpu/cmm_op.h"
#include "cpu/linear_op.h"

namespace ufb {
namespace {

// The same computation for eager calls from Python, as a bare CPython function (METH_FASTCALL): no pybind11
// argument conversion, no empty leaves tensor, no tuple of two tensors, which on one token would cost as much as
// the kernel (docs/kernel.md). Arguments as the op's (b_out optional: None or absent for no bias);
// returns (y, leaves or None).
PyObject* cmm_eager(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 6 && nargs != 7) {
    PyErr_Format(PyExc_TypeError,
                 "cmm_eager(x, w_in, b_in, w_out, depth, return_leaves, b_out=None) takes 6 or 7 arguments, got %zd",
                 nargs);
    return nullptr;
  }
  const bool has_bias = nargs == 7 && args[6] != Py_None;
  if (has_bias && !THPVariable_Check(args[6])) {
    PyErr_Format(PyExc_TypeError, "cmm_eager: b_out must be a Tensor or None, got %s", Py_TYPE(args[6])->tp_name);
    return nullptr;
  }
  for (int i = 0; i < 4; ++i) {
    if (!THPVariable_Check(args[i])) {
      PyErr_Format(PyExc_TypeError, "cmm_eager: argument %d must be a Tensor, got %s", i, Py_TYPE(args[i])->tp_name);
      return nullptr;
    }
  }
  if (!PyLong_Check(args[4])) {
    PyErr_Format(PyExc_TypeError, "cmm_eager: depth must be an int, got %s", Py_TYPE(args[4])->tp_name);
    return nullptr;
  }
  const long long depth = PyLong_AsLongLong(args[4]);
  if (depth == -1 && PyErr_Occurred()) return nullptr;
  const int return_leaves = PyObject_IsTrue(args[5]);
  if (return_leaves < 0) return nullptr;

  at::Tensor y, leaves;
  run_eager(THPVariable_Unpack(args[0]), THPVariable_Unpack(args[1]), THPVariable_Unpack(args[2]),
            THPVariable_Unpack(args[3]), depth, return_leaves != 0, has_bias ? &THPVariable_Unpack(args[6]) : nullptr,
            y, leaves);
  PyObject* out = PyTuple_New(2);
  if (out == nullptr) return nullptr;
  PyTuple_SET_ITEM(out, 0, THPVariable_Wrap(std::move(y)));
  if (return_leaves) {
    PyTuple_SET_ITEM(out, 1, THPVariable_Wrap(std::move(leaves)));
  } else {
    Py_INCREF(Py_None);
    PyTuple_SET_ITEM(out, 1, Py_None);
  }
  return out;
  END_HANDLE_TH_ERRORS
}

// engine.linear's eager call, linear_eager(x, weight, bias=None): torch.ops.ufb.linear over x [..., K] without the
// dispatcher, for the calls linear_applies accepts (float32 CPU, no autograd to record, no autocast); anything else
// returns NotImplemented and Python runs F.linear, which also raises the usual errors for bad arguments.
PyObject* linear_eager_py(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 2 && nargs != 3) {
    PyErr_Format(PyExc_TypeError, "linear_eager(x, weight, bias=None) takes 2 or 3 arguments, got %zd", nargs);
    return nullptr;
  }
  const bool has_bias = nargs == 3 && args[2] != Py_None;
  if (!THPVariable_Check(args[0]) || !THPVariable_Check(args[1]) || (has_bias && !THPVariable_Check(args[2])))
    Py_RETURN_NOTIMPLEMENTED;
  const at::Tensor& x = THPVariable_Unpack(args[0]);
  const at::Tensor& weight = THPVariable_Unpack(args[1]);
  const at::Tensor* bias = has_bias ? &THPVariable_Unpack(args[2]) : nullptr;
  if (!linear_applies(x, weight, bias)) Py_RETURN_NOTIMPLEMENTED;
  return THPVariable_Wrap(linear_eager(x, weight, bias));
  END_HANDLE_TH_ERRORS
}

// engine.attention's eager call, attention_eager(qkv, starts, lengths, num_heads): torch.ops.ufb.varlen_attention
// without the dispatcher, for the calls varlen_attention_applies accepts; anything else returns NotImplemented and
// Python runs torch's scaled_dot_product_attention. Bad shapes raise RuntimeError.
PyObject* attention_eager_py(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 4) {
    PyErr_Format(PyExc_TypeError, "attention_eager(qkv, starts, lengths, num_heads) takes 4 arguments, got %zd",
                 nargs);
    return nullptr;
  }
  if (!THPVariable_Check(args[0]) || !THPVariable_Check(args[1]) || !THPVariable_Check(args[2]) ||
      !PyLong_Check(args[3]))
    Py_RETURN_NOTIMPLEMENTED;
  const long long heads = PyLong_AsLongLong(args[3]);
  if (heads == -1 && PyErr_Occurred()) return nullptr;
  const at::Tensor& qkv = THPVariable_Unpack(args[0]);
  if (!varlen_attention_applies(qkv)) Py_RETURN_NOTIMPLEMENTED;
  return THPVariable_Wrap(
      varlen_attention(qkv, THPVariable_Unpack(args[1]), THPVariable_Unpack(args[2]), heads, true));
  END_HANDLE_TH_ERRORS
}

// What engine.derived compares on every inference call to tell whether a cached copy (packed FFF weights, BERT's
// fused QKV) is still current: per tensor its identity, storage, version and size, four words. An inference tensor
// has no version counter and records -1, as the Python fallback does.
constexpr Py_ssize_t kStampWords = 4;
constexpr Py_ssize_t kMaxStampTensors = 16;

void stamp_words(const at::Tensor& t, int64_t* words) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  words[0] = reinterpret_cast<int64_t>(impl);
  words[1] = impl->has_storage() ? reinterpret_cast<int64_t>(t.const_data_ptr()) : 0;
  words[2] = t.is_inference() ? -1 : static_cast<int64_t>(t._version());
  words[3] = t.numel();
}

// The stamp of the argument tensors as one bytes object: one call instead of data_ptr() and _version reads per
// tensor from Python (engine.derived.python_stamp, the fallback), which would be a large share of a one-token call.
PyObject* tensor_stamp(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs > kMaxStampTensors) {
    PyErr_Format(PyExc_TypeError, "tensor_stamp takes at most %zd tensors, got %zd", kMaxStampTensors, nargs);
    return nullptr;
  }
  int64_t words[kStampWords * kMaxStampTensors];
  for (Py_ssize_t i = 0; i < nargs; ++i) {
    if (!THPVariable_Check(args[i])) {
      PyErr_Format(PyExc_TypeError, "tensor_stamp: argument %zd must be a Tensor, got %s", i,
                   Py_TYPE(args[i])->tp_name);
      return nullptr;
    }
    stamp_words(THPVariable_Unpack(args[i]), words + kStampWords * i);
  }
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(words),
                                   static_cast<Py_ssize_t>(sizeof(int64_t)) * kStampWords * nargs);
  END_HANDLE_TH_ERRORS
}

// Attribute names the FFF fast path reads, interned once at import.
struct FffNames {
  PyObject *training, *impl, *kernel, *record_leaves, *depth, *weight_dtype, *packed, *entry, *modules, *linear_in,
      *linear_out, *parameters, *weight, *bias, *leaves;
};
FffNames g_fff{};

bool init_fff_names() {
  const std::pair<PyObject**, const char*> names[] = {
      {&g_fff.training, "training"},   {&g_fff.impl, "_impl"},         {&g_fff.kernel, "kernel"},
      {&g_fff.record_leaves, "record_leaves"}, {&g_fff.depth, "depth"}, {&g_fff.weight_dtype, "_weight_dtype"},
      {&g_fff.packed, "_packed"},      {&g_fff.entry, "_entry"},       {&g_fff.modules, "_modules"},
      {&g_fff.linear_in, "linear_in"}, {&g_fff.linear_out, "linear_out"}, {&g_fff.parameters, "_parameters"},
      {&g_fff.weight, "weight"},       {&g_fff.bias, "bias"},          {&g_fff.leaves, "_leaves"}};
  for (const auto& [slot, name] : names) {
    *slot = PyUnicode_InternFromString(name);
    if (*slot == nullptr) return false;
  }
  return true;
}

// A new reference to obj.name, or nullptr with no Python error set where it is missing (any other error stays set).
PyObject* attr_or_null(PyObject* obj, PyObject* name) {
  PyObject* value = PyObject_GetAttr(obj, name);
  if (value == nullptr && PyErr_ExceptionMatches(PyExc_AttributeError)) PyErr_Clear();
  return value;
}

// engine.fff.FFF.forward's serving case as one call, fff_forward(module, x): the module in eval mode with the kernel
// impl, x a float32 [N, d_in] CPU tensor, and packed weights (module._packed._entry: (stamp, weight dtype,
// (w_in, b_in, w_out, b_out))) whose stamp still matches the parameters. It then returns y, recording the
// leaves in module._leaves[thread id] when module.record_leaves is set, as the Python path does. Anything else
// returns NotImplemented and the Python path handles it (and packs the weights anew where they were stale).
// Done in Python, the checks and lookups would cost about as much as the kernel on one token (docs/kernel.md).
PyObject* fff_forward(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 2) {
    PyErr_Format(PyExc_TypeError, "fff_forward(module, x) takes 2 arguments, got %zd", nargs);
    return nullptr;
  }
  PyObject* mod = args[0];
  if (!THPVariable_Check(args[1])) Py_RETURN_NOTIMPLEMENTED;
  const at::Tensor& x = THPVariable_Unpack(args[1]);
  if (x.dim() != 2 || x.scalar_type() != at::kFloat || !x.device().is_cpu()) Py_RETURN_NOTIMPLEMENTED;

  // Every new reference lives in `held` and is released on return, whichever return it is (exceptions included).
  struct Held {
    PyObject* refs[16] = {};  // 13 at most below
    int n = 0;
    PyObject* keep(PyObject* ref) {
      TORCH_INTERNAL_ASSERT(n < 16, "fff_forward: more references than Held has room for");
      return refs[n++] = ref;
    }
    ~Held() {
      for (int i = 0; i < n; ++i) Py_XDECREF(refs[i]);
    }
  } held;
  auto get = [&](PyObject* obj, PyObject* name) { return held.keep(attr_or_null(obj, name)); };

  PyObject* training = get(mod, g_fff.training);
  PyObject* impl = get(mod, g_fff.impl);
  if (training != Py_False || impl == nullptr || !PyUnicode_Check(impl) ||
      PyUnicode_Compare(impl, g_fff.kernel) != 0) {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NOTIMPLEMENTED;
  }
  PyObject* packed = get(mod, g_fff.packed);
  PyObject* entry = packed != nullptr ? get(packed, g_fff.entry) : nullptr;
  PyObject* dtype = get(mod, g_fff.weight_dtype);
  PyObject* depth_obj = get(mod, g_fff.depth);
  PyObject* modules = get(mod, g_fff.modules);
  if (PyErr_Occurred()) return nullptr;
  // entry: (stamp bytes, weight dtype, (w_in, b_in, w_out, b_out or None)); a Python-made stamp (a tuple) or
  // another weight dtype means the Python path decides.
  if (entry == nullptr || !PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 3 ||
      !PyBytes_CheckExact(PyTuple_GET_ITEM(entry, 0)) || PyTuple_GET_ITEM(entry, 1) != dtype ||
      depth_obj == nullptr || !PyLong_CheckExact(depth_obj) || modules == nullptr || !PyDict_Check(modules))
    Py_RETURN_NOTIMPLEMENTED;
  PyObject* value = PyTuple_GET_ITEM(entry, 2);
  if (!PyTuple_CheckExact(value) || PyTuple_GET_SIZE(value) != 4) Py_RETURN_NOTIMPLEMENTED;
  PyObject* lin_in = PyDict_GetItemWithError(modules, g_fff.linear_in);
  PyObject* lin_out = lin_in != nullptr ? PyDict_GetItemWithError(modules, g_fff.linear_out) : nullptr;
  if (lin_out == nullptr) {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NOTIMPLEMENTED;
  }
  // The sources in the order FFF._kernel_weights stamps them: linear_in.weight, linear_in.bias,
  // linear_out.weight, then linear_out.bias where there is one.
  PyObject* params_in = get(lin_in, g_fff.parameters);
  PyObject* params_out = get(lin_out, g_fff.parameters);
  if (params_in == nullptr || !PyDict_Check(params_in) || params_out == nullptr || !PyDict_Check(params_out)) {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NOTIMPLEMENTED;
  }
  // borrowed: the dicts (held) keep them alive
  PyObject* sources[4] = {PyDict_GetItemWithError(params_in, g_fff.weight),
                          PyDict_GetItemWithError(params_in, g_fff.bias),
                          PyDict_GetItemWithError(params_out, g_fff.weight),
                          PyDict_GetItemWithError(params_out, g_fff.bias)};
  if (PyErr_Occurred()) return nullptr;
  const Py_ssize_t n_sources = sources[3] != nullptr && sources[3] != Py_None ? 4 : 3;
  int64_t words[kStampWords * 4];
  for (Py_ssize_t i = 0; i < n_sources; ++i) {
    if (sources[i] == nullptr || !THPVariable_Check(sources[i])) Py_RETURN_NOTIMPLEMENTED;
    stamp_words(THPVariable_Unpack(sources[i]), words + kStampWords * i);
  }
  PyObject* stamp = PyTuple_GET_ITEM(entry, 0);
  if (PyBytes_GET_SIZE(stamp) != Py_ssize_t(sizeof(int64_t)) * kStampWords * n_sources ||
      std::memcmp(PyBytes_AS_STRING(stamp), words, sizeof(int64_t) * kStampWords * n_sources) != 0)
    Py_RETURN_NOTIMPLEMENTED;  // a parameter changed: the Python path repacks

  PyObject* tensors[4];
  for (int i = 0; i < 4; ++i) {
    tensors[i] = PyTuple_GET_ITEM(value, i);
    if (!(THPVariable_Check(tensors[i]) || (i == 3 && tensors[i] == Py_None))) Py_RETURN_NOTIMPLEMENTED;
  }
  const at::Tensor& w_in = THPVariable_Unpack(tensors[0]);
  if (w_in.dim() != 3 || x.size(1) != w_in.size(2)) Py_RETURN_NOTIMPLEMENTED;  // the Python path names the error
  const long long depth = PyLong_AsLongLong(depth_obj);
  if (depth == -1 && PyErr_Occurred()) return nullptr;
  PyObject* record_obj = get(mod, g_fff.record_leaves);
  if (record_obj == nullptr) {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NOTIMPLEMENTED;
  }
  const int record = PyObject_IsTrue(record_obj);
  if (record < 0) return nullptr;
  PyObject* leaves_dict = nullptr;
  if (record) {
    leaves_dict = get(mod, g_fff.leaves);
    if (leaves_dict == nullptr || !PyDict_Check(leaves_dict)) {
      if (PyErr_Occurred()) return nullptr;
      Py_RETURN_NOTIMPLEMENTED;
    }
  }

  at::Tensor y, leaves;
  run_eager(x, w_in, THPVariable_Unpack(tensors[1]), THPVariable_Unpack(tensors[2]), depth,
            record != 0, tensors[3] == Py_None ? nullptr : &THPVariable_Unpack(tensors[3]), y, leaves);
  if (record) {
    PyObject* ident = PyLong_FromUnsignedLong(PyThread_get_thread_ident());  // what threading.get_ident() returns
    if (ident == nullptr) return nullptr;
    held.keep(ident);
    PyObject* wrapped = THPVariable_Wrap(std::move(leaves));
    if (wrapped == nullptr) return nullptr;
    held.keep(wrapped);
    if (PyDict_SetItem(leaves_dict, ident, wrapped) != 0) return nullptr;
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

PyMethodDef fff_forward_def = {
    "fff_forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&fff_forward)), METH_FASTCALL,
    "engine.fff.FFF.forward's serving case in one call: y, or NotImplemented where the Python path must decide"};

PyMethodDef tensor_stamp_def = {
    "tensor_stamp", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&tensor_stamp)), METH_FASTCALL,
    "bytes that change when any argument tensor is modified in place, gets new storage or is another tensor"};

PyMethodDef cmm_eager_def = {"cmm_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&cmm_eager)),
                             METH_FASTCALL, "cmm without the dispatcher (eager calls): (y, leaves or None)"};

PyMethodDef attention_eager_def = {
    "attention_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&attention_eager_py)),
    METH_FASTCALL, "torch.ops.ufb.varlen_attention without the dispatcher, or NotImplemented where SDPA must run"};

PyMethodDef linear_eager_def = {
    "linear_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&linear_eager_py)), METH_FASTCALL,
    "torch.ops.ufb.linear over x [..., K] without the dispatcher, or NotImplemented where F.linear must run"};
}  // namespace

void add_fast_path(pybind11::module_& m) {
  // engine.cmm uses cmm_eager in eager mode and the op under torch.compile.
  m.add_object("cmm_eager", pybind11::reinterpret_steal<pybind11::object>(PyCFunction_New(&cmm_eager_def, nullptr)));
  m.add_object("linear_eager",
               pybind11::reinterpret_steal<pybind11::object>(PyCFunction_New(&linear_eager_def, nullptr)));
  m.add_object("attention_eager",
               pybind11::reinterpret_steal<pybind11::object>(PyCFunction_New(&attention_eager_def, nullptr)));
  if (!init_fff_names()) throw pybind11::error_already_set();
  m.add_object("fff_forward",
               pybind11::reinterpret_steal<pybind11::object>(PyCFunction_New(&fff_forward_def, nullptr)));
  m.add_object("tensor_stamp",
               pybind11::reinterpret_steal<pybind11::object>(PyCFunction_New(&tensor_stamp_def, nullptr)));
}

}  // namespace ufb
