// The pickling pass's per-object work, in C: torch.save's pickler calls a
// persistent_id for every object and a reducer for every tensor, ~10,000 of
// each for a large checkpoint, and at ~1 us of Python apiece that was most of
// an async save's stall. See ckptio/pickling.py for what each must match.
//
// The declarations below are shared with native_pickler.cc, which writes
// the whole pickle itself and uses the same storage tables and tests.
#pragma once

#include <pybind11/pybind11.h>

// Adds persistent_id_filter and dense_reducer to the module.
void DefinePickleFastPath(pybind11::module_& m);

namespace ckptio::pickle {

// An owned reference, released on scope exit.
struct Ref {
  PyObject* p = nullptr;
  explicit Ref(PyObject* o = nullptr) : p(o) {}
  ~Ref() { Py_XDECREF(p); }
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
};

// Interned attribute names, the two strings persistent ids hold ("storage",
// the location "cpu") and the device type "cuda".
struct Names {
  PyObject *is_cpu, *is_cuda, *layout, *is_quantized, *dtype, *backward_hooks, *dict, *untyped_storage,
      *storage_offset, *size, *stride, *requires_grad, *data_ptr, *cdata, *nbytes, *itemsize, *storage, *cpu, *cuda;
};
const Names& AttrNames();

// persistent_id_filter's object (see pickle_fast_path.cc).
struct PersistentIdFilter {
  PyObject_HEAD
  PyObject* fallback;
  PyObject* never;  // tuple of exact types
};

constexpr Py_ssize_t kRegistryLists = 6;

// dense_reducer's object: the reducer's constants and the pickling pass's
// storage tables, shared with pickling.py's persistent_id.
struct DenseReducer {
  PyObject_HEAD
  PyObject* fallback;         // t -> torch's reduction
  PyObject* rebuild;          // torch._utils._rebuild_tensor_v2
  PyObject* strided;          // torch.strided
  PyObject* v3_dtypes;        // frozenset of dtypes torch rebuilds with _rebuild_tensor_v3
  PyObject* get_metadata;     // torch._C._get_tensor_metadata
  PyObject* keys;             // dict: storage._cdata -> key (str)
  PyObject* storage_dtypes;   // dict: storage.data_ptr() -> dtype
  PyObject* registry;         // list of kRegistryLists lists, one item per storage, in key order:
                              // storages, locations, nbytes, device types, data_ptrs, _cdata
  PyObject* storage_types;    // dict cache: dtype -> torch.<Dtype>Storage
  PyObject* storage_type_of;  // dtype -> torch.<Dtype>Storage, on a cache miss (it fills the cache)
  PyObject* location_tag;     // storage -> location, when not simply "cpu"
  int cpu_is_cpu;             // every CPU storage is tagged "cpu"
};

// The parts of a storage's persistent id ("storage", storage_type, key,
// location, numel); all new references.
struct StoragePid {
  Ref storage_type, key, location, numel;
};

bool IsPersistentIdFilter(PyObject* o);
bool IsDenseReducer(PyObject* o);
PyObject* OrderedDictClass();  // collections.OrderedDict, known once a dense reducer exists

// What the filter answers for `obj`: None or a persistent id (new
// reference), or nullptr with a Python error set.
PyObject* FilterPersistentId(PersistentIdFilter* f, PyObject* obj);

// 1: `t` is a plain dense tensor (sets *on_cpu and *dtype_out, a new
// reference); 0: torch must reduce it; -1: a Python error is set.
int IsPlainDense(const DenseReducer* r, PyObject* t, const Names& n, bool* on_cpu, PyObject** dtype_out);

// Registers `storage` viewed as `dtype` in the pass's tables if new and
// fills `out`; false with a Python error set on failure (including torch's
// refusal of one storage viewed as two dtypes).
bool RegisterStorage(DenseReducer* r, PyObject* storage, PyObject* dtype, bool on_cpu, const Names& n,
                     StoragePid* out);

}  // namespace ckptio::pickle
