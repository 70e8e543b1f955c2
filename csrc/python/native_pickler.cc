// pickle.Pickler(protocol=2).dump(obj), byte for byte, for checkpoints.
//
// Even with the tensor reduction and persistent_id in C, CPython's pickler
// still makes and saves ~20 objects per tensor (the rebuild arguments, the
// persistent id tuple, size and stride tuples, an OrderedDict), ~6 us a
// tensor: 60 ms of an async save's stall for 10,000 tensors. This writer
// follows CPython's Modules/_pickle.c save() step by step for protocol 2
// (binary, no framing), the same persistent_id filter and dispatch table,
// and writes a plain dense tensor's opcodes straight from its attributes
// (~1 us), consuming the memo indices its temporary objects would have
// taken.
//
// What it does not follow (bytes objects, sets, nested globals, copyreg
// extension codes, __newobj_ex__, state setters, a reduction that is not
// a tuple, a recursion error) makes it give up: it returns None and the
// caller pickles with pickle.Pickler, so the bytes are always CPython's.
// Errors raised by Python code it calls (a __reduce__, persistent_id,
// torch's refusal of a storage viewed as two dtypes) propagate as they
// would from pickle.Pickler.
#include "native_pickler.h"

#include <cstdint>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

#include "pickle_fast_path.h"

namespace py = pybind11;
using namespace ckptio::pickle;

namespace {

// Protocol-2 opcodes (Lib/pickle.py).
constexpr char kMark = '(', kStop = '.', kPop = '0', kPopMark = '1', kBinInt = 'J', kBinInt1 = 'K',
               kBinInt2 = 'M', kNone = 'N', kBinPersId = 'Q', kReduce = 'R', kBinUnicode = 'X', kEmptyList = ']',
               kAppend = 'a', kBuild = 'b', kAppends = 'e', kBinGet = 'h', kLongBinGet = 'j', kEmptyDict = '}',
               kSetItem = 's', kTuple = 't', kSetItems = 'u', kBinFloat = 'G', kEmptyTuple = ')', kBinPut = 'q',
               kLongBinPut = 'r', kProto = '\x80', kNewObj = '\x81', kTuple1 = '\x85', kNewTrue = '\x88',
               kNewFalse = '\x89', kLong1 = '\x8a', kLong4 = '\x8b';
constexpr Py_ssize_t kBatchSize = 1000;  // pickle's BATCHSIZE for APPENDS / SETITEMS
constexpr int kMaxDepth = 500;           // nested containers written here; deeper goes to pickle

struct GiveUp {};        // not handled here: the caller uses pickle.Pickler
struct PythonError {};   // a Python error is set: propagate it

PyObject* Check(PyObject* o) {
  if (o == nullptr) throw PythonError{};
  return o;
}

// The memo's index: object address -> memo index, open addressing with
// linear probing in one array (a node-based map allocates per entry and
// misses the cache on every lookup; a checkpoint memoizes ~2 objects a tensor).
class AddressIndex {
 public:
  const uint32_t* Find(PyObject* key) const {
    if (slots_.empty()) return nullptr;
    for (size_t i = Hash(key) & Mask();; i = (i + 1) & Mask()) {
      if (slots_[i].key == key) return &slots_[i].value;
      if (slots_[i].key == nullptr) return nullptr;
    }
  }

  void Insert(PyObject* key, uint32_t value) {  // `key` is not in the index
    if ((used_ + 1) * 2 > slots_.size()) Grow();
    size_t i = Hash(key) & Mask();
    while (slots_[i].key != nullptr) i = (i + 1) & Mask();
    slots_[i] = Slot{key, value};
    ++used_;
  }

 private:
  struct Slot {
    PyObject* key = nullptr;
    uint32_t value = 0;
  };

  static size_t Hash(PyObject* p) {
    uint64_t h = (reinterpret_cast<uintptr_t>(p) >> 4) * 0x9E3779B97F4A7C15ull;  // objects are 16-byte aligned
    return static_cast<size_t>(h ^ (h >> 29));
  }
  size_t Mask() const { return slots_.size() - 1; }

  void Grow() {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(old.empty() ? 1024 : old.size() * 2, Slot{});
    used_ = 0;
    for (const Slot& s : old) {
      if (s.key != nullptr) Insert(s.key, s.value);
    }
  }

  std::vector<Slot> slots_;
  size_t used_ = 0;
};

class Protocol2Writer {
 public:
  Protocol2Writer(PersistentIdFilter* filter, DenseReducer* reducer, PyObject* dispatch_table,
                  PyTypeObject* tensor_type)
      : filter_(filter), reducer_(reducer), dispatch_table_(dispatch_table), tensor_type_(tensor_type),
        names_(AttrNames()) {}

  ~Protocol2Writer() {
    for (PyObject* o : kept_) Py_DECREF(o);
    for (auto& g : globals_) Py_DECREF(g.first);
  }

  std::string Dump(PyObject* obj) {
    out_.push_back(kProto);
    out_.push_back('\x02');
    Save(obj, false);
    out_.push_back(kStop);
    return std::move(out_);
  }

 private:
  void Op(char c) { out_.push_back(c); }
  void Write(const char* p, size_t n) { out_.append(p, n); }
  void Uint32(uint32_t v) {
    char b[4] = {static_cast<char>(v), static_cast<char>(v >> 8), static_cast<char>(v >> 16),
                 static_cast<char>(v >> 24)};
    Write(b, 4);
  }

  // --- the memo (pickle's memo_put / memo_get) ---
  // Memoized objects are kept alive until the end, as pickle's memo does,
  // so no object met later can reuse an address. nullptr stands for a
  // temporary object only the writer knew: its index is used, never looked up.
  void MemoPut(PyObject* obj) {
    uint32_t index = memo_size_++;
    if (obj != nullptr) {
      memo_.Insert(obj, index);
      Py_INCREF(obj);
      kept_.push_back(obj);
    }
    if (index < 256) {
      Op(kBinPut);
      Op(static_cast<char>(index));
    } else {
      Op(kLongBinPut);
      Uint32(index);
    }
  }

  bool MemoGet(PyObject* obj) {
    const uint32_t* index = memo_.Find(obj);
    if (index == nullptr) return false;
    if (*index < 256) {
      Op(kBinGet);
      Op(static_cast<char>(*index));
    } else {
      Op(kLongBinGet);
      Uint32(*index);
    }
    return true;
  }

  bool InMemo(PyObject* obj) const { return memo_.Find(obj) != nullptr; }

  // --- save() ---
  void Save(PyObject* obj, bool pers_save) {
    if (!pers_save) {
      Ref pid(Check(FilterPersistentId(filter_, obj)));
      if (pid.p != Py_None) {
        Save(pid.p, true);
        Op(kBinPersId);
        return;
      }
    }
    PyTypeObject* type = Py_TYPE(obj);
    if (obj == Py_None) return Op(kNone);
    if (obj == Py_True || obj == Py_False) return Op(obj == Py_True ? kNewTrue : kNewFalse);
    if (type == &PyLong_Type) return SaveLong(obj);
    if (type == &PyFloat_Type) return SaveFloat(PyFloat_AS_DOUBLE(obj));
    if (MemoGet(obj)) return;
    if (type == &PyBytes_Type) throw GiveUp{};  // reduced through _codecs.encode: not followed here
    if (type == &PyUnicode_Type) return SaveUnicode(obj);
    // Deeper than any checkpoint: pickle.Pickler judges it (its limit is
    // Python's, and this thread's C stack may be small).
    if (depth_ >= kMaxDepth) throw GiveUp{};
    if (Py_EnterRecursiveCall(" while pickling an object")) throw PythonError{};
    struct Leave {
      int& depth;
      ~Leave() {
        --depth;
        Py_LeaveRecursiveCall();
      }
    } leave{++depth_};
    if (type == &PyDict_Type) return SaveDict(obj);
    if (type == &PyList_Type) return SaveList(obj);
    if (type == &PyTuple_Type) return SaveTuple(obj);
    if (type == &PySet_Type || type == &PyFrozenSet_Type || type == &PyByteArray_Type ||
        type == &PyPickleBuffer_Type) {
      throw GiveUp{};
    }
    if (type == &PyType_Type || type == &PyFunction_Type) return SaveGlobal(obj, nullptr);
    Ref reduced(nullptr);
    if (type == tensor_type_) {
      // The dispatch table's entry for torch.Tensor is the dense reducer.
      bool on_cpu = false;
      Ref dtype(nullptr);
      int plain = IsPlainDense(reducer_, obj, names_, &on_cpu, &dtype.p);
      if (plain < 0) throw PythonError{};
      if (plain == 1) return SaveDenseTensor(obj, dtype.p, on_cpu);
      reduced.p = Check(PyObject_CallOneArg(reducer_->fallback, obj));
    } else {
      PyObject* reduce = PyDict_GetItemWithError(dispatch_table_, reinterpret_cast<PyObject*>(type));  // borrowed
      if (reduce != nullptr) {
        reduced.p = Check(PyObject_CallOneArg(reduce, obj));
      } else if (PyErr_Occurred()) {
        throw PythonError{};
      } else if (PyType_IsSubtype(type, &PyType_Type)) {
        return SaveGlobal(obj, nullptr);
      } else {
        Ref reduce_ex(PyObject_GetAttrString(obj, "__reduce_ex__"));
        if (!reduce_ex.p) {  // pickle then tries __reduce__: not followed here
          if (!PyErr_ExceptionMatches(PyExc_AttributeError)) throw PythonError{};
          throw GiveUp{};
        }
        Ref protocol(Check(PyLong_FromLong(2)));
        reduced.p = Check(PyObject_CallOneArg(reduce_ex.p, protocol.p));
      }
    }
    if (PyUnicode_Check(reduced.p)) return SaveGlobal(obj, reduced.p);
    if (!PyTuple_Check(reduced.p)) throw GiveUp{};  // pickle raises its own PicklingError
    SaveReduce(reduced.p, obj);
  }

  void SaveLong(PyObject* obj) {
    int overflow = 0;
    long value = PyLong_AsLongAndOverflow(obj, &overflow);
    if (value == -1 && PyErr_Occurred()) throw PythonError{};
    if (!overflow && value <= 0x7fffffffL && value >= -0x7fffffffL - 1) {
      const auto u = static_cast<uint32_t>(value);
      if ((u >> 16) != 0) {
        Op(kBinInt);
        Uint32(u);
      } else if ((u >> 8) != 0) {
        Op(kBinInt2);
        Op(static_cast<char>(u));
        Op(static_cast<char>(u >> 8));
      } else {
        Op(kBinInt1);
        Op(static_cast<char>(u));
      }
      return;
    }
    // LONG1 / LONG4: little-endian two's complement, one byte more than the
    // magnitude's bits need, trimmed back when that byte is only sign.
    Ref bits(Check(PyObject_CallMethod(obj, "bit_length", nullptr)));
    const Py_ssize_t nbits = PyLong_AsSsize_t(bits.p);
    if (nbits < 0) throw PythonError{};
    Py_ssize_t nbytes = (nbits >> 3) + 1;
    if (nbytes > 0x7fffffffL) throw GiveUp{};
    Ref signed_bytes(Check(SignedLittleEndian(obj, nbytes)));
    const auto* data = reinterpret_cast<const unsigned char*>(PyBytes_AS_STRING(signed_bytes.p));
    const int negative = PyObject_RichCompareBool(obj, Zero(), Py_LT);
    if (negative < 0) throw PythonError{};
    if (negative && nbytes > 1 && data[nbytes - 1] == 0xff && (data[nbytes - 2] & 0x80) != 0) --nbytes;
    if (nbytes < 256) {
      Op(kLong1);
      Op(static_cast<char>(nbytes));
    } else {
      Op(kLong4);
      Uint32(static_cast<uint32_t>(nbytes));
    }
    Write(reinterpret_cast<const char*>(data), static_cast<size_t>(nbytes));
  }

  static PyObject* Zero() {
    static PyObject* zero = PyLong_FromLong(0);
    return zero;
  }

  // obj.to_bytes(nbytes, "little", signed=True)
  static PyObject* SignedLittleEndian(PyObject* obj, Py_ssize_t nbytes) {
    Ref method(PyObject_GetAttrString(obj, "to_bytes"));
    if (!method.p) return nullptr;
    Ref args(Py_BuildValue("(ns)", nbytes, "little"));
    Ref kwargs(Py_BuildValue("{s:O}", "signed", Py_True));
    if (!args.p || !kwargs.p) return nullptr;
    return PyObject_Call(method.p, args.p, kwargs.p);
  }

  void SaveFloat(double x) {
    Op(kBinFloat);
    uint64_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    for (int shift = 56; shift >= 0; shift -= 8) Op(static_cast<char>(bits >> shift));  // big-endian
  }

  void SaveUnicode(PyObject* obj) {
    Py_ssize_t size = 0;
    const char* data = PyUnicode_AsUTF8AndSize(obj, &size);
    Ref encoded(nullptr);
    if (data == nullptr) {  // lone surrogates: pickle encodes with "surrogatepass"
      PyErr_Clear();
      encoded.p = Check(PyUnicode_AsEncodedString(obj, "utf-8", "surrogatepass"));
      data = PyBytes_AS_STRING(encoded.p);
      size = PyBytes_GET_SIZE(encoded.p);
    }
    if (static_cast<size_t>(size) > 0xffffffffUL) throw GiveUp{};  // protocol 2 refuses it
    Op(kBinUnicode);
    Uint32(static_cast<uint32_t>(size));
    Write(data, static_cast<size_t>(size));
    MemoPut(obj);
  }

  // `fresh`: a tuple pickle would have made itself for this pass, so never
  // met before and never met again: only its memo index is used.
  void SaveTuple(PyObject* obj, bool fresh = false) {
    const Py_ssize_t n = PyTuple_GET_SIZE(obj);
    if (n == 0) return Op(kEmptyTuple);
    if (n > 3) Op(kMark);
    for (Py_ssize_t i = 0; i < n; ++i) Save(PyTuple_GET_ITEM(obj, i), false);
    if (!fresh && InMemo(obj)) {  // a tuple that contains itself (through a list or dict): pop what was pushed
      if (n > 3) {
        Op(kPopMark);
      } else {
        for (Py_ssize_t i = 0; i < n; ++i) Op(kPop);
      }
      MemoGet(obj);
      return;
    }
    Op(n > 3 ? kTuple : static_cast<char>(kTuple1 + n - 1));
    MemoPut(fresh ? nullptr : obj);
  }

  void SaveList(PyObject* obj) {
    Op(kEmptyList);
    MemoPut(obj);
    if (PyList_GET_SIZE(obj) == 0) return;
    if (PyList_GET_SIZE(obj) == 1) {
      Ref item(PyList_GET_ITEM(obj, 0));
      Py_INCREF(item.p);
      Save(item.p, false);
      return Op(kAppend);
    }
    Py_ssize_t total = 0;
    do {
      Op(kMark);
      for (Py_ssize_t batch = 0; total < PyList_GET_SIZE(obj) && batch < kBatchSize; ++batch, ++total) {
        Ref item(PyList_GET_ITEM(obj, total));
        Py_INCREF(item.p);
        Save(item.p, false);
      }
      Op(kAppends);
    } while (total < PyList_GET_SIZE(obj));
  }

  void SaveDict(PyObject* obj) {
    Op(kEmptyDict);
    MemoPut(obj);
    const Py_ssize_t size = PyDict_GET_SIZE(obj);
    if (size == 0) return;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    if (size == 1) {
      PyDict_Next(obj, &pos, &key, &value);
      SaveItem(key, value);
      return Op(kSetItem);
    }
    // Batches of BATCHSIZE; a size that is a multiple of it ends with an
    // empty MARK SETITEMS, as pickle's batch_dict_exact writes.
    Py_ssize_t in_batch;
    do {
      in_batch = 0;
      Op(kMark);
      while (PyDict_Next(obj, &pos, &key, &value)) {
        SaveItem(key, value);
        if (++in_batch == kBatchSize) break;
      }
      Op(kSetItems);
      if (PyDict_GET_SIZE(obj) != size) {
        PyErr_SetString(PyExc_RuntimeError, "dictionary changed size during iteration");
        throw PythonError{};
      }
    } while (in_batch == kBatchSize);
  }

  void SaveItem(PyObject* key, PyObject* value) {
    Ref k(key), v(value);  // the dict may change under a __reduce__: hold both
    Py_INCREF(key);
    Py_INCREF(value);
    Save(key, false);
    Save(value, false);
  }

  // pickle's batch_list / batch_dict: the items of a reduction's iterator,
  // a lone one followed by `one_op`, else MARK, items, `many_op` in batches
  // of BATCHSIZE. `check` runs on each item before it is used.
  template <typename Check, typename SaveOne>
  void Batch(PyObject* iterator, Check check, SaveOne save_one, char one_op, char many_op) {
    for (;;) {
      Ref first(NextItem(iterator));
      if (!first.p) return;
      check(first.p);
      Ref next(NextItem(iterator));
      if (!next.p) {
        save_one(first.p);
        return Op(one_op);
      }
      Op(kMark);
      save_one(first.p);
      Py_ssize_t n = 1;
      while (next.p) {
        check(next.p);
        save_one(next.p);
        Py_CLEAR(next.p);
        if (++n == kBatchSize) break;
        next.p = NextItem(iterator);
      }
      Op(many_op);
      if (n != kBatchSize) return;
    }
  }

  // The iterator's next item (new reference), nullptr at its end.
  static PyObject* NextItem(PyObject* iterator) {
    PyObject* item = PyIter_Next(iterator);
    if (item == nullptr && PyErr_Occurred()) throw PythonError{};
    return item;
  }

  void BatchAppends(PyObject* iterator) {
    Batch(iterator, [](PyObject*) {}, [this](PyObject* item) { Save(item, false); }, kAppend, kAppends);
  }

  void BatchSetItems(PyObject* iterator) {
    auto is_pair = [](PyObject* item) {
      if (!PyTuple_Check(item) || PyTuple_Size(item) != 2) throw GiveUp{};  // pickle raises a TypeError
    };
    auto save_pair = [this](PyObject* pair) {
      Save(PyTuple_GET_ITEM(pair, 0), false);
      Save(PyTuple_GET_ITEM(pair, 1), false);
    };
    Batch(iterator, is_pair, save_pair, kSetItem, kSetItems);
  }

  // pickle's save_reduce for a reduction tuple of `obj`.
  void SaveReduce(PyObject* reduction, PyObject* obj) {
    const Py_ssize_t size = PyTuple_GET_SIZE(reduction);
    if (size < 2 || size > 6) throw GiveUp{};
    PyObject* callable = PyTuple_GET_ITEM(reduction, 0);
    PyObject* args = PyTuple_GET_ITEM(reduction, 1);
    auto item = [&](Py_ssize_t i) -> PyObject* {
      PyObject* o = i < size ? PyTuple_GET_ITEM(reduction, i) : Py_None;
      return o == Py_None ? nullptr : o;
    };
    PyObject* state = item(2);
    PyObject* list_items = item(3);
    PyObject* dict_items = item(4);
    if (item(5) != nullptr) throw GiveUp{};  // a state setter
    if (!PyCallable_Check(callable) || !PyTuple_Check(args)) throw GiveUp{};
    if ((list_items && !PyIter_Check(list_items)) || (dict_items && !PyIter_Check(dict_items))) throw GiveUp{};

    bool use_newobj = false;
    PyObject* name = PyObject_GetAttrString(callable, "__name__");
    if (name == nullptr) {
      if (!PyErr_ExceptionMatches(PyExc_AttributeError)) throw PythonError{};
      PyErr_Clear();
    } else {
      Ref owned(name);
      if (PyUnicode_Check(name)) {
        if (PyUnicode_CompareWithASCIIString(name, "__newobj_ex__") == 0) throw GiveUp{};
        use_newobj = PyUnicode_CompareWithASCIIString(name, "__newobj__") == 0;
      }
    }
    if (use_newobj) {
      if (PyTuple_GET_SIZE(args) < 1) throw GiveUp{};
      PyObject* cls = PyTuple_GET_ITEM(args, 0);
      if (!PyType_Check(cls)) throw GiveUp{};
      Ref obj_class(Check(PyObject_GetAttrString(obj, "__class__")));
      if (obj_class.p != cls) throw GiveUp{};
      Save(cls, false);
      Ref rest(Check(PyTuple_GetSlice(args, 1, PyTuple_GET_SIZE(args))));
      Save(rest.p, false);
      Op(kNewObj);
    } else {
      Save(callable, false);
      Save(args, false);
      Op(kReduce);
    }
    if (InMemo(obj)) {  // obj was reached again while saving its own reduction
      Op(kPop);
      MemoGet(obj);
      return;
    }
    MemoPut(obj);
    if (list_items) BatchAppends(list_items);
    if (dict_items) BatchSetItems(dict_items);
    if (state) {
      Save(state, false);
      Op(kBuild);
    }
  }

  // pickle's save_global: the GLOBAL opcode pickle writes for `obj`
  // (asked of pickle itself once per object and dump, so the module lookup,
  // the identity check and the protocol-2 name mapping are its own), then
  // memoized. Nested names and extension codes are not followed.
  void SaveGlobal(PyObject* obj, PyObject* /*name: pickle.dumps finds it the same way*/) {
    auto it = globals_.find(obj);
    if (it == globals_.end()) {
      static PyObject* dumps = [] {
        Ref module(PyImport_ImportModule("pickle"));
        return module.p ? PyObject_GetAttrString(module.p, "dumps") : nullptr;
      }();
      if (dumps == nullptr) throw PythonError{};
      Ref protocol(Check(PyLong_FromLong(2)));
      Ref pickled(PyObject_CallFunctionObjArgs(dumps, obj, protocol.p, nullptr));
      if (!pickled.p) {
        PyErr_Clear();  // pickle raises its own error for it
        throw GiveUp{};
      }
      // b"\x80\x02" b"c<module>\n<name>\n" b"q\x00" b"."
      std::string all(PyBytes_AS_STRING(pickled.p), static_cast<size_t>(PyBytes_GET_SIZE(pickled.p)));
      if (all.size() < 8 || all.compare(0, 3, "\x80\x02" "c", 3) != 0 ||
          all.compare(all.size() - 3, 3, std::string("q\x00.", 3)) != 0) {
        throw GiveUp{};
      }
      std::string global = all.substr(2, all.size() - 5);
      size_t first = global.find('\n');
      if (first == std::string::npos || global.find('\n', first + 1) != global.size() - 1) throw GiveUp{};
      Py_INCREF(obj);
      it = globals_.emplace(obj, std::move(global)).first;
    }
    out_ += it->second;
    MemoPut(obj);
  }

  // What pickling (_rebuild_tensor_v2, (<persistent id>, storage_offset,
  // size, stride, requires_grad, OrderedDict()[, metadata])) writes, the
  // reduction pickle_fast_path.cc's dense reducer returns.
  void SaveDenseTensor(PyObject* t, PyObject* dtype, bool on_cpu) {
    const Names& n = names_;
    Ref storage(Check(PyObject_CallMethodNoArgs(t, n.untyped_storage)));
    StoragePid pid;
    if (!RegisterStorage(reducer_, storage.p, dtype, on_cpu, n, &pid)) throw PythonError{};
    Ref offset(Check(PyObject_CallMethodNoArgs(t, n.storage_offset)));
    Ref size(Check(PyObject_CallMethodNoArgs(t, n.size)));
    Ref stride(Check(PyObject_CallMethodNoArgs(t, n.stride)));
    Ref requires_grad(Check(PyObject_GetAttr(t, n.requires_grad)));
    Ref metadata(Check(PyObject_CallOneArg(reducer_->get_metadata, t)));
    int has_metadata = PyObject_IsTrue(metadata.p);
    if (has_metadata < 0 || !PyTuple_Check(size.p) || !PyTuple_Check(stride.p)) throw GiveUp{};

    Save(reducer_->rebuild, false);
    Op(kMark);  // the rebuild arguments: a fresh tuple of 6 or 7
    // The persistent id: a fresh tuple of 5, then BINPERSID.
    Op(kMark);
    Save(n.storage, false);
    Save(pid.storage_type.p, false);
    Save(pid.key.p, false);
    Save(pid.location.p, false);
    Save(pid.numel.p, false);
    Op(kTuple);
    MemoPut(nullptr);
    Op(kBinPersId);
    Save(offset.p, false);
    SaveTuple(size.p, /*fresh=*/true);  // tuple(t.size()): a new tuple, equal items
    SaveTuple(stride.p, /*fresh=*/true);
    Save(requires_grad.p, false);
    // OrderedDict(): the class, no arguments, REDUCE, memoized (a fresh object).
    Save(OrderedDictClass(), false);
    Op(kEmptyTuple);
    Op(kReduce);
    MemoPut(nullptr);
    if (has_metadata) Save(metadata.p, false);
    Op(kTuple);
    MemoPut(nullptr);
    Op(kReduce);
    MemoPut(t);
  }

  PersistentIdFilter* filter_;
  DenseReducer* reducer_;
  PyObject* dispatch_table_;
  PyTypeObject* tensor_type_;
  const Names& names_;
  std::string out_;
  AddressIndex memo_;
  std::vector<PyObject*> kept_;
  uint32_t memo_size_ = 0;
  int depth_ = 0;
  std::unordered_map<PyObject*, std::string> globals_;  // per dump: object -> its GLOBAL opcode
};

}  // namespace

void DefineNativePickler(py::module_& m) {
  m.def(
      "pickle_protocol2",
      [](py::object obj, py::object persistent_id, py::object dense_reducer, py::dict dispatch_table,
         py::type tensor_type) -> py::object {
        if (!IsPersistentIdFilter(persistent_id.ptr()) || !IsDenseReducer(dense_reducer.ptr())) {
          throw py::type_error("pickle_protocol2 takes ckptio._C's persistent_id_filter and dense_reducer");
        }
        if (PyDict_GetItemWithError(dispatch_table.ptr(), tensor_type.ptr()) != dense_reducer.ptr()) {
          return py::none();  // torch.Tensor is not reduced by this dense reducer: nothing here applies
        }
        Protocol2Writer writer(reinterpret_cast<PersistentIdFilter*>(persistent_id.ptr()),
                               reinterpret_cast<DenseReducer*>(dense_reducer.ptr()), dispatch_table.ptr(),
                               reinterpret_cast<PyTypeObject*>(tensor_type.ptr()));
        std::string data;
        try {
          data = writer.Dump(obj.ptr());
        } catch (const GiveUp&) {
          PyErr_Clear();
          return py::none();
        } catch (const PythonError&) {
          if (PyErr_ExceptionMatches(PyExc_RecursionError)) {  // its depth is pickle's to judge
            PyErr_Clear();
            return py::none();
          }
          throw py::error_already_set();
        }
        return py::bytes(data);
      },
      py::arg("obj"), py::arg("persistent_id"), py::arg("dense_reducer"), py::arg("dispatch_table"),
      py::arg("tensor_type"),
      "pickle.Pickler(f, protocol=2) with this persistent_id and dispatch_table, dumping `obj`: its bytes,\n"
      "or None where the caller must use pickle.Pickler (see csrc/python/native_pickler.cc).");
}
