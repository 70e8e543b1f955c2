#include "pickle_fast_path.h"

namespace py = pybind11;

namespace ckptio::pickle {
namespace {

// A static type whose objects only C code here makes (no tp_new).
PyTypeObject MadeInCType(const char* name, Py_ssize_t size, const char* doc) {
  PyTypeObject t{PyVarObject_HEAD_INIT(nullptr, 0)};
  t.tp_name = name;
  t.tp_basicsize = size;
  t.tp_flags = Py_TPFLAGS_DEFAULT;
  t.tp_doc = doc;
  return t;
}

// Stands for the empty OrderedDict() (backward hooks) in a dense tensor's
// rebuild arguments: it pickles to the same bytes (the OrderedDict class,
// no arguments, REDUCE; a fresh object, so memoized like a fresh dict)
// without OrderedDict.__reduce__'s Python-level slot-name lookup.
PyObject* g_ordered_dict = nullptr;  // collections.OrderedDict, set with the first dense reducer

struct EmptyOrderedDict {
  PyObject_HEAD
};

PyObject* EmptyOrderedDictReduce(PyObject*, PyObject*) { return Py_BuildValue("(O())", g_ordered_dict); }

PyMethodDef kEmptyOrderedDictMethods[] = {
    {"__reduce_ex__", EmptyOrderedDictReduce, METH_O, "(OrderedDict, ())"},  // what the pickler asks
    {nullptr, nullptr, 0, nullptr},
};

PyTypeObject kEmptyOrderedDictType = [] {
  PyTypeObject t = MadeInCType("ckptio._C.EmptyOrderedDict", sizeof(EmptyOrderedDict), "Pickles as OrderedDict().");
  t.tp_methods = kEmptyOrderedDictMethods;
  return t;
}();

// What the dense reducer puts where the storage goes in a tensor's rebuild
// arguments: the storage's persistent id, already made (the storage was
// registered when its tensor was reduced, which the pickler does right
// before it meets the storage: the keys come out in the same order).
struct PidHolder {
  PyObject_HEAD
  PyObject* pid;
};

void PidHolderDealloc(PyObject* self) {
  Py_XDECREF(reinterpret_cast<PidHolder*>(self)->pid);
  Py_TYPE(self)->tp_free(self);
}

PyTypeObject kPidHolderType = [] {
  PyTypeObject t = MadeInCType("ckptio._C.PidHolder", sizeof(PidHolder),
                               "A storage's persistent id, made by the dense reducer.");
  t.tp_dealloc = PidHolderDealloc;
  return t;
}();

// The pickler calls persistent_id for every object it meets (~20 per tensor
// in a checkpoint: the ints of each size and stride, keys, tuples), and a
// Python function call costs ~0.4 us. This C function answers None at once
// for objects that are never storages and hands only the rest to the Python
// fallback, ckptio.pickling's persistent_id. Never storages: the built-in
// values, every class (torch's check is an isinstance test on instances, and
// the storage classes in each persistent id come through here), and the
// exact types in `never` (torch.Tensor, nn.Parameter: reduced, not persisted).
PyObject* PersistentIdFilterCall(PyObject* self, PyObject* args, PyObject* kwargs) {
  PyObject* obj = nullptr;
  if (kwargs != nullptr || !PyArg_UnpackTuple(args, "persistent_id", 1, 1, &obj)) {
    PyErr_SetString(PyExc_TypeError, "persistent_id takes exactly one positional argument");
    return nullptr;
  }
  return FilterPersistentId(reinterpret_cast<PersistentIdFilter*>(self), obj);
}

void PersistentIdFilterDealloc(PyObject* self) {
  auto* f = reinterpret_cast<PersistentIdFilter*>(self);
  Py_XDECREF(f->fallback);
  Py_XDECREF(f->never);
  Py_TYPE(self)->tp_free(self);
}

PyTypeObject kPersistentIdFilterType = [] {
  PyTypeObject t = MadeInCType("ckptio._C.PersistentIdFilter", sizeof(PersistentIdFilter),
                               "None for objects that are never storages; anything else goes to the Python fallback.");
  t.tp_call = PersistentIdFilterCall;
  t.tp_dealloc = PersistentIdFilterDealloc;
  return t;
}();

// torch.Tensor.__reduce_ex__(2) for a plain dense tensor, as ckptio.pickling's
// _reduce_dense does it in Python (its comments say what must match):
// (_rebuild_tensor_v2, (<storage>, storage_offset, size, stride,
// requires_grad, OrderedDict()[, metadata])), where <storage> is a PidHolder
// with the persistent id torch's pickler writes for the tensor's storage,
// registered here in the pickling pass's tables (shared with its Python
// persistent_id, which handles storages of tensors torch reduces itself). A
// tensor that is not plain (device other than cpu/cuda, another layout,
// quantized, a v3 dtype, backward hooks, Python attributes) goes to
// `fallback`, torch's own reduction. Built only while a tensor's Python state
// is its instance dict.
PyObject* DenseReducerCall(PyObject* self, PyObject* args, PyObject* kwargs) {
  auto* r = reinterpret_cast<DenseReducer*>(self);
  PyObject* t = nullptr;
  if (kwargs != nullptr || !PyArg_UnpackTuple(args, "reduce", 1, 1, &t)) {
    PyErr_SetString(PyExc_TypeError, "the tensor reducer takes exactly one positional argument");
    return nullptr;
  }
  const Names& n = AttrNames();
  bool on_cpu = false;
  Ref dtype(nullptr);
  int plain = IsPlainDense(r, t, n, &on_cpu, &dtype.p);
  if (plain < 0) return nullptr;
  if (plain == 0) return PyObject_CallOneArg(r->fallback, t);

  Ref storage(PyObject_CallMethodNoArgs(t, n.untyped_storage));
  if (!storage.p) return nullptr;
  StoragePid parts;
  if (!RegisterStorage(r, storage.p, dtype.p, on_cpu, n, &parts)) return nullptr;
  Ref pid(PyTuple_Pack(5, n.storage, parts.storage_type.p, parts.key.p, parts.location.p, parts.numel.p));
  if (!pid.p) return nullptr;
  Ref offset(PyObject_CallMethodNoArgs(t, n.storage_offset));
  Ref size_obj(PyObject_CallMethodNoArgs(t, n.size));
  Ref stride(PyObject_CallMethodNoArgs(t, n.stride));
  Ref requires_grad(PyObject_GetAttr(t, n.requires_grad));
  Ref hooks(PyObject_New(PyObject, &kEmptyOrderedDictType));
  Ref metadata(PyObject_CallOneArg(r->get_metadata, t));
  if (!offset.p || !size_obj.p || !stride.p || !requires_grad.p || !hooks.p || !metadata.p) return nullptr;
  Ref size(PySequence_Tuple(size_obj.p));  // torch.Size -> tuple, as tuple(t.size())
  Ref stride_tuple(PySequence_Tuple(stride.p));
  if (!size.p || !stride_tuple.p) return nullptr;
  auto* holder = PyObject_New(PidHolder, &kPidHolderType);
  if (holder == nullptr) return nullptr;
  holder->pid = pid.p;
  Py_INCREF(pid.p);
  Ref holder_ref(reinterpret_cast<PyObject*>(holder));
  int has_metadata = PyObject_IsTrue(metadata.p);
  if (has_metadata < 0) return nullptr;
  Ref rebuild_args(has_metadata ? PyTuple_Pack(7, holder_ref.p, offset.p, size.p, stride_tuple.p, requires_grad.p,
                                               hooks.p, metadata.p)
                                : PyTuple_Pack(6, holder_ref.p, offset.p, size.p, stride_tuple.p, requires_grad.p,
                                               hooks.p));
  if (!rebuild_args.p) return nullptr;
  return PyTuple_Pack(2, r->rebuild, rebuild_args.p);
}

void DenseReducerDealloc(PyObject* self) {
  auto* r = reinterpret_cast<DenseReducer*>(self);
  for (PyObject* o : {r->fallback, r->rebuild, r->strided, r->v3_dtypes, r->get_metadata, r->keys,
                      r->storage_dtypes, r->registry, r->storage_types, r->storage_type_of,
                      r->location_tag}) {
    Py_XDECREF(o);
  }
  Py_TYPE(self)->tp_free(self);
}

PyTypeObject kDenseReducerType = [] {
  PyTypeObject t = MadeInCType("ckptio._C.DenseReducer", sizeof(DenseReducer),
                               "torch.Tensor's reduction for plain dense tensors; the rest go to the fallback.");
  t.tp_call = DenseReducerCall;
  t.tp_dealloc = DenseReducerDealloc;
  return t;
}();

}  // namespace

const Names& AttrNames() {
  // The strings "storage" and "cpu" are the interned ones torch's own
  // persistent_id and CPU tagger return: one object each, so the pickler's
  // memo treats them alike whichever path made a persistent id.
  static const Names names = [] {
    auto n = [](const char* s) { return PyUnicode_InternFromString(s); };
    return Names{n("is_cpu"), n("is_cuda"), n("layout"), n("is_quantized"), n("dtype"), n("_backward_hooks"),
                 n("__dict__"), n("untyped_storage"), n("storage_offset"), n("size"), n("stride"),
                 n("requires_grad"), n("data_ptr"), n("_cdata"), n("nbytes"), n("itemsize"), n("storage"),
                 n("cpu"), n("cuda")};
  }();
  return names;
}

PyObject* FilterPersistentId(PersistentIdFilter* f, PyObject* obj) {
  PyTypeObject* t = Py_TYPE(obj);
  if (t == &kEmptyOrderedDictType) Py_RETURN_NONE;
  if (t == &kPidHolderType) {
    PyObject* pid = reinterpret_cast<PidHolder*>(obj)->pid;
    Py_INCREF(pid);
    return pid;
  }
  if (obj == Py_None || t == &PyLong_Type || t == &PyFloat_Type || t == &PyBool_Type || t == &PyUnicode_Type ||
      t == &PyBytes_Type || t == &PyTuple_Type || t == &PyList_Type || t == &PyDict_Type || t == &PyODict_Type ||
      t == &PyFunction_Type || PyType_Check(obj)) {
    Py_RETURN_NONE;
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(f->never); ++i) {
    if (reinterpret_cast<PyObject*>(t) == PyTuple_GET_ITEM(f->never, i)) Py_RETURN_NONE;
  }
  return PyObject_CallOneArg(f->fallback, obj);
}

// 1: plain dense (fast path), 0: not (fallback), -1: a Python error is set.
// Sets *on_cpu, and *dtype (a new reference) when it returns 1.
int IsPlainDense(const DenseReducer* r, PyObject* t, const Names& n, bool* on_cpu, PyObject** dtype_out) {
  // t.device.type in ("cpu", "cuda"), without making a device object.
  Ref is_cpu(PyObject_GetAttr(t, n.is_cpu));
  if (!is_cpu.p) return -1;
  *on_cpu = is_cpu.p == Py_True;
  if (!*on_cpu) {
    Ref is_cuda(PyObject_GetAttr(t, n.is_cuda));
    if (!is_cuda.p) return -1;
    if (is_cuda.p != Py_True) return 0;
  }
  Ref layout(PyObject_GetAttr(t, n.layout));
  if (!layout.p) return -1;
  if (layout.p != r->strided) return 0;
  Ref quantized(PyObject_GetAttr(t, n.is_quantized));
  if (!quantized.p) return -1;
  int q = PyObject_IsTrue(quantized.p);
  if (q != 0) return q < 0 ? -1 : 0;
  Ref dtype(PyObject_GetAttr(t, n.dtype));
  if (!dtype.p) return -1;
  int v3 = PySet_Contains(r->v3_dtypes, dtype.p);
  if (v3 != 0) return v3 < 0 ? -1 : 0;
  Ref hooks(PyObject_GetAttr(t, n.backward_hooks));
  if (!hooks.p) return -1;
  int h = PyObject_IsTrue(hooks.p);
  if (h != 0) return h < 0 ? -1 : 0;
  Ref dict(PyObject_GetAttr(t, n.dict));
  if (!dict.p) return -1;
  int d = PyObject_IsTrue(dict.p);
  if (d != 0) return d < 0 ? -1 : 0;
  Py_INCREF(dtype.p);
  *dtype_out = dtype.p;
  return 1;
}

// pickling.py's add_storage, for the dense path.
bool RegisterStorage(DenseReducer* r, PyObject* storage, PyObject* dtype, bool on_cpu, const Names& n,
                     StoragePid* out) {
  Ref data_ptr(PyObject_CallMethodNoArgs(storage, n.data_ptr));
  if (!data_ptr.p) return false;
  int null_ptr = PyObject_Not(data_ptr.p);
  if (null_ptr < 0) return false;
  if (!null_ptr) {
    PyObject* seen = PyDict_SetDefault(r->storage_dtypes, data_ptr.p, dtype);  // borrowed
    if (seen == nullptr) return false;
    if (seen != dtype) {
      PyErr_SetString(PyExc_RuntimeError,
                      "Cannot save multiple tensors or storages that view the same data as different types");
      return false;
    }
  }
  Ref& location = out->location;
  if (on_cpu && r->cpu_is_cpu) {
    Py_INCREF(n.cpu);
    location.p = n.cpu;
  } else {
    location.p = PyObject_CallOneArg(r->location_tag, storage);
    if (!location.p) return false;
  }
  Ref cdata(PyObject_GetAttr(storage, n.cdata));
  if (!cdata.p) return false;
  Ref nbytes(PyObject_CallMethodNoArgs(storage, n.nbytes));
  if (!nbytes.p) return false;
  PyObject* key = PyDict_GetItemWithError(r->keys, cdata.p);  // borrowed
  Ref new_key(nullptr);
  if (key == nullptr) {
    if (PyErr_Occurred()) return false;
    Ref count(PyLong_FromSsize_t(PyDict_GET_SIZE(r->keys)));
    if (!count.p) return false;
    new_key.p = PyObject_Str(count.p);  // str(len(keys)), as pickling.py makes it
    if (!new_key.p || PyDict_SetItem(r->keys, cdata.p, new_key.p) < 0) return false;
    // The facts the snapshot needs, in PickledState's order (see pickling.py).
    PyObject* facts[] = {storage, location.p, nbytes.p, on_cpu ? n.cpu : n.cuda, data_ptr.p, cdata.p};
    for (Py_ssize_t i = 0; i < kRegistryLists; ++i) {
      if (PyList_Append(PyList_GET_ITEM(r->registry, i), facts[i]) < 0) return false;
    }
    key = new_key.p;
  }
  Py_INCREF(key);
  out->key.p = key;
  PyObject* storage_type = PyDict_GetItemWithError(r->storage_types, dtype);  // borrowed
  if (storage_type == nullptr) {
    if (PyErr_Occurred()) return false;
    out->storage_type.p = PyObject_CallOneArg(r->storage_type_of, dtype);
    if (!out->storage_type.p) return false;
  } else {
    Py_INCREF(storage_type);
    out->storage_type.p = storage_type;
  }
  Ref itemsize(PyObject_GetAttr(dtype, n.itemsize));
  if (!itemsize.p) return false;
  out->numel.p = PyNumber_FloorDivide(nbytes.p, itemsize.p);
  return out->numel.p != nullptr;
}

bool IsPersistentIdFilter(PyObject* o) { return Py_TYPE(o) == &kPersistentIdFilterType; }
bool IsDenseReducer(PyObject* o) { return Py_TYPE(o) == &kDenseReducerType; }
PyObject* OrderedDictClass() { return g_ordered_dict; }

}  // namespace ckptio::pickle

using namespace ckptio::pickle;

void DefinePickleFastPath(py::module_& m) {
  m.def(
      "persistent_id_filter",
      [](py::object fallback, py::tuple never) {
        if (PyType_Ready(&kPersistentIdFilterType) < 0) throw py::error_already_set();
        auto* f = PyObject_New(PersistentIdFilter, &kPersistentIdFilterType);
        if (f == nullptr) throw py::error_already_set();
        f->fallback = fallback.inc_ref().ptr();
        f->never = never.inc_ref().ptr();
        return py::reinterpret_steal<py::object>(reinterpret_cast<PyObject*>(f));
      },
      py::arg("fallback"), py::arg("never") = py::tuple(),
      "A persistent_id for pickle.Pickler: None for built-in values, classes and the exact types in\n"
      "`never` (in C); fallback(obj) for the rest.");
  m.def(
      "dense_reducer",
      [](py::object fallback, py::object rebuild, py::object strided, py::object v3_dtypes, py::object get_metadata,
         py::object ordered_dict, py::dict keys, py::dict storage_dtypes, py::list registry,
         py::dict storage_types, py::object storage_type_of, py::object location_tag, bool cpu_is_cpu) {
        if (registry.size() != kRegistryLists) throw py::value_error("dense_reducer: registry must hold 6 lists");
        for (py::handle l : registry) {
          if (!PyList_CheckExact(l.ptr())) throw py::type_error("dense_reducer: registry must hold 6 lists");
        }
        if (PyType_Ready(&kDenseReducerType) < 0 || PyType_Ready(&kPidHolderType) < 0 ||
            PyType_Ready(&kEmptyOrderedDictType) < 0) {
          throw py::error_already_set();
        }
        if (g_ordered_dict == nullptr) g_ordered_dict = ordered_dict.inc_ref().ptr();
        auto* r = PyObject_New(DenseReducer, &kDenseReducerType);
        if (r == nullptr) throw py::error_already_set();
        r->fallback = fallback.inc_ref().ptr();
        r->rebuild = rebuild.inc_ref().ptr();
        r->strided = strided.inc_ref().ptr();
        r->v3_dtypes = v3_dtypes.inc_ref().ptr();
        r->get_metadata = get_metadata.inc_ref().ptr();
        r->keys = keys.inc_ref().ptr();
        r->storage_dtypes = storage_dtypes.inc_ref().ptr();
        r->registry = registry.inc_ref().ptr();
        r->storage_types = storage_types.inc_ref().ptr();
        r->storage_type_of = storage_type_of.inc_ref().ptr();
        r->location_tag = location_tag.inc_ref().ptr();
        r->cpu_is_cpu = cpu_is_cpu;
        return py::reinterpret_steal<py::object>(reinterpret_cast<PyObject*>(r));
      },
      "A reducer for torch.Tensor in a pickler's dispatch_table that also registers each storage in the\n"
      "pickling pass's tables (see ckptio.pickling).");
}
