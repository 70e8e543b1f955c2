#include "engine/pickle_check.h"

#include <cstdio>
#include <cstring>
#include <vector>

namespace ckptio {
namespace {

// What an object on the unpickler's stack is, as far as the rules care.
enum class Kind : uint8_t {
  kScalar,           // None, bools, ints, floats, strings
  kTuple,
  kDict,             // EMPTY_DICT: a fresh dict
  kList,             // EMPTY_LIST: a fresh list
  kOrderedDictType,  // GLOBAL collections.OrderedDict
  kOrderedDict,      // REDUCE of collections.OrderedDict: a fresh OrderedDict
  kGlobal,           // any other GLOBAL: shared with every other load
  kCalled,           // what REDUCE of a GLOBAL returned (a tensor, a parameter)
  kStorage,          // what BINPERSID returned
};

const char* KindName(Kind k) {
  switch (k) {
    case Kind::kScalar: return "a scalar";
    case Kind::kTuple: return "a tuple";
    case Kind::kDict: return "a dict";
    case Kind::kList: return "a list";
    case Kind::kOrderedDictType: return "the global collections.OrderedDict";
    case Kind::kOrderedDict: return "an OrderedDict";
    case Kind::kGlobal: return "a global";
    case Kind::kCalled: return "an object a global returned";
    case Kind::kStorage: return "a persistent id's storage";
  }
  return "an object";
}

class Checker {
 public:
  Checker(const uint8_t* data, size_t size) : p_(data), begin_(data), end_(data + size) {}

  PickleCheck Run() {
    while (p_ < end_) {
      op_at_ = static_cast<size_t>(p_ - begin_);
      const uint8_t op = *p_++;
      if (!Step(op)) return Refuse();
      if (stopped_) {
        if (stack_.size() != 1 || !marks_.empty()) return Refuse("STOP with a malformed stack");
        return PickleCheck{true, false, ""};
      }
    }
    return Refuse("the pickle ends before STOP");
  }

 private:
  // One opcode; false (with why_ set) when the fast path may not run it.
  bool Step(uint8_t op) {
    switch (op) {
      case 0x80: return Skip(1);                                     // PROTO
      case '.': stopped_ = true; return true;                        // STOP
      case '(': marks_.push_back(stack_.size()); return true;        // MARK
      case ')': return Push(Kind::kTuple);                           // EMPTY_TUPLE
      case 't': return PopMark() && Push(Kind::kTuple);              // TUPLE
      case 0x85: return PopN(1) && Push(Kind::kTuple);               // TUPLE1
      case 0x86: return PopN(2) && Push(Kind::kTuple);               // TUPLE2
      case 0x87: return PopN(3) && Push(Kind::kTuple);               // TUPLE3
      case '}': return Push(Kind::kDict);                            // EMPTY_DICT
      case ']': return Push(Kind::kList);                            // EMPTY_LIST
      case 'N': case 0x88: case 0x89: return Push(Kind::kScalar);    // NONE NEWTRUE NEWFALSE
      case 'J': return Skip(4) && Push(Kind::kScalar);               // BININT
      case 'K': return Skip(1) && Push(Kind::kScalar);               // BININT1
      case 'M': return Skip(2) && Push(Kind::kScalar);               // BININT2
      case 'G': return Skip(8) && Push(Kind::kScalar);               // BINFLOAT
      case 0x8a: return SkipCounted(1) && Push(Kind::kScalar);       // LONG1
      case 'U': return SkipCounted(1) && Push(Kind::kScalar);        // SHORT_BINSTRING
      case 'T': case 'X': return SkipCounted(4) && Push(Kind::kScalar);  // BINSTRING BINUNICODE
      case 'c': return Global();                                     // GLOBAL
      case 'R': return Reduce();                                     // REDUCE
      case 'Q': return Pop(Kind::kTuple, "BINPERSID") && Push(Kind::kStorage);  // BINPERSID
      case 'q': return MemoPut(1);                                   // BINPUT
      case 'r': return MemoPut(4);                                   // LONG_BINPUT
      case 'h': return MemoGet(1);                                   // BINGET
      case 'j': return MemoGet(4);                                   // LONG_BINGET
      case 'b': return PopN(1) && Target("BUILD", Kind::kOrderedDict, Kind::kOrderedDict);  // BUILD
      case 's': return PopN(2) && Target("SETITEM", Kind::kDict, Kind::kOrderedDict);       // SETITEM
      case 'u': return PopMark() && Target("SETITEMS", Kind::kDict, Kind::kOrderedDict);    // SETITEMS
      case 'a': return PopN(1) && Target("APPEND", Kind::kList, Kind::kList);              // APPEND
      case 'e': return PopMark() && Target("APPENDS", Kind::kList, Kind::kList);           // APPENDS
      default: {
        char hex[8];
        std::snprintf(hex, sizeof hex, "0x%02x", op);
        return Fail(std::string("opcode ") + hex + " is outside the fast path");
      }
    }
  }

  bool Fail(std::string why) {
    why_ = std::move(why);
    return false;
  }
  PickleCheck Refuse(std::string why = "") {
    if (!why.empty()) why_ = std::move(why);
    return PickleCheck{false, unsafe_, why_ + " at byte " + std::to_string(op_at_)};
  }

  bool Skip(size_t n) {
    if (static_cast<size_t>(end_ - p_) < n) return Fail("an opcode's argument runs past the end");
    p_ += n;
    return true;
  }
  bool ReadUint(size_t width, uint32_t* out) {
    if (static_cast<size_t>(end_ - p_) < width) return Fail("an opcode's argument runs past the end");
    uint32_t v = 0;
    for (size_t i = 0; i < width; ++i) v |= static_cast<uint32_t>(p_[i]) << (8 * i);  // little-endian
    p_ += width;
    *out = v;
    return true;
  }
  bool SkipCounted(size_t width) {
    uint32_t n = 0;
    return ReadUint(width, &n) && Skip(n);
  }

  bool Push(Kind k) {
    stack_.push_back(k);
    return true;
  }
  // Items above the innermost mark, if any.
  size_t Floor() const { return marks_.empty() ? 0 : marks_.back(); }
  bool PopN(size_t n) {
    if (stack_.size() - Floor() < n) return Fail("an opcode pops more than its stack holds");
    stack_.resize(stack_.size() - n);
    return true;
  }
  bool Pop(Kind want, const char* op) {
    if (stack_.size() == Floor()) return Fail(std::string(op) + " on an empty stack");
    if (stack_.back() != want) return Fail(std::string(op) + " of " + KindName(stack_.back()));
    stack_.pop_back();
    return true;
  }
  bool PopMark() {
    if (marks_.empty()) return Fail("no MARK to pop to");
    stack_.resize(marks_.back());
    marks_.pop_back();
    return true;
  }
  // The object an opcode writes into (it stays on the stack) is of kind a or b.
  bool Target(const char* op, Kind a, Kind b) {
    if (stack_.size() == Floor()) return Fail(std::string(op) + " with no object to act on");
    const Kind k = stack_.back();
    if (k == a || k == b) return true;
    // Only what a call returned (a tensor, a Counter) may take writes this
    // check cannot judge; into anything else a write is never torch.save's.
    unsafe_ = k != Kind::kCalled;
    return Fail(std::string(op) + " on " + KindName(k));
  }

  bool Global() {
    const uint8_t* module_end = static_cast<const uint8_t*>(std::memchr(p_, '\n', end_ - p_));
    if (module_end == nullptr) return Fail("GLOBAL without a module line");
    const uint8_t* name = module_end + 1;
    const uint8_t* name_end = static_cast<const uint8_t*>(std::memchr(name, '\n', end_ - name));
    if (name_end == nullptr) return Fail("GLOBAL without a name line");
    const bool ordered_dict = Equals(p_, module_end, "collections") && Equals(name, name_end, "OrderedDict");
    p_ = name_end + 1;
    return Push(ordered_dict ? Kind::kOrderedDictType : Kind::kGlobal);
  }
  static bool Equals(const uint8_t* b, const uint8_t* e, const char* s) {
    const size_t n = std::strlen(s);
    return static_cast<size_t>(e - b) == n && std::memcmp(b, s, n) == 0;
  }

  bool Reduce() {
    if (!Pop(Kind::kTuple, "REDUCE's arguments")) return false;
    if (stack_.size() == Floor()) return Fail("REDUCE with nothing to call");
    const Kind callee = stack_.back();
    if (callee == Kind::kOrderedDictType) {
      stack_.back() = Kind::kOrderedDict;
    } else if (callee == Kind::kGlobal) {
      stack_.back() = Kind::kCalled;
    } else {
      return Fail(std::string("REDUCE calls ") + KindName(callee));
    }
    return true;
  }

  // Memo indices are numbered from 0 as objects are stored, so each is below
  // the pickle's size; a larger one is not something torch.save writes.
  bool MemoPut(size_t width) {
    uint32_t index = 0;
    if (!ReadUint(width, &index)) return false;
    if (stack_.size() == Floor()) return Fail("BINPUT with an empty stack");
    if (index >= static_cast<size_t>(end_ - begin_)) return Fail("a memo index beyond the pickle's size");
    if (index >= memo_.size()) memo_.resize(index + 1, kUnset);
    memo_[index] = static_cast<uint8_t>(stack_.back());
    return true;
  }
  bool MemoGet(size_t width) {
    uint32_t index = 0;
    if (!ReadUint(width, &index)) return false;
    if (index >= memo_.size() || memo_[index] == kUnset) return Fail("BINGET of a memo entry never stored");
    return Push(static_cast<Kind>(memo_[index]));
  }

  const uint8_t* p_;
  const uint8_t* const begin_;
  const uint8_t* const end_;
  size_t op_at_ = 0;
  bool stopped_ = false;
  bool unsafe_ = false;  // the refusal is a write into a global
  std::string why_;
  std::vector<Kind> stack_;
  std::vector<size_t> marks_;  // stack sizes at each MARK
  static constexpr uint8_t kUnset = 0xff;
  std::vector<uint8_t> memo_;  // Kind of each stored entry, kUnset where none
};

}  // namespace

PickleCheck CheckFastPickle(const uint8_t* data, size_t size) { return Checker(data, size).Run(); }

}  // namespace ckptio
