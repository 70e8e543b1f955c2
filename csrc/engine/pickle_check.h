// Which pickles ckptio's fast unpickling path may hand to CPython's C
// unpickler, decided from the opcodes alone, before any of them runs.
//
// The fast path (ckptio/skeleton.py) gives the C unpickler a handful of
// globals: rebuild functions, collections.OrderedDict, storage-type markers
// and dtypes. The C unpickler lets BUILD, SETITEM and APPEND act on whatever
// object is on its stack, so a pickle that calls nothing could still write
// into one of those shared objects (a marker's dtype, a function's
// __defaults__) and change every later load in the process. torch's
// weights-only unpickler restricts each of those opcodes by the type of its
// target; this check does the same by tracking what kind of object each
// stack slot and memo entry holds.
//
// The accepted language is what torch.save writes for plain tensors and
// containers, and a subset of what torch's weights-only unpickler accepts:
//   - opcodes: PROTO STOP MARK, tuples, EMPTY_DICT/LIST, NONE/NEWTRUE/NEWFALSE,
//     BININT/BININT1/BININT2/LONG1/BINFLOAT, BINUNICODE/SHORT_BINSTRING/BINSTRING,
//     GLOBAL, REDUCE, BINPERSID, BINPUT/LONG_BINPUT, BINGET/LONG_BINGET,
//     BUILD, SETITEM(S), APPEND(S);
//   - REDUCE only calls a GLOBAL with a tuple of arguments;
//   - BUILD only on an OrderedDict made by this pickle (a state_dict's
//     _metadata), SETITEM(S) only on a dict or such an OrderedDict,
//     APPEND(S) only on a list made by this pickle.
// A write into a global, or into a container the pickle made but of the
// wrong kind, is flagged `unsafe`: torch.save never writes one and torch's
// weights-only unpickler refuses it (before torch 2.9 only BUILD was checked:
// SETITEM/APPEND then reached the object itself), so the caller refuses it
// outright on every torch release. Anything else is not refused outright: the caller
// falls back to torch's own unpickler, which judges it (and refuses what
// weights_only refuses).
// Which globals may be named is the caller's find_class's job.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace ckptio {

struct PickleCheck {
  bool fast = false;    // the fast path may run this pickle
  bool unsafe = false;  // a BUILD/SETITEM/APPEND that torch's weights-only unpickler refuses
                        // whatever its release: into a global (shared with every later load) or
                        // into a container of the wrong kind; no unpickler may run it
  std::string reason;   // when not fast: the first opcode it may not run, and where
};

// Thread-safe; reads data[0, size) only.
PickleCheck CheckFastPickle(const uint8_t* data, size_t size);

}  // namespace ckptio
