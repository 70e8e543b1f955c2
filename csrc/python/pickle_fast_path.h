// The pickling pass's per-object work, in C: torch.save's pickler calls a
// persistent_id for every object and a reducer for every tensor, ~10,000 of
// each for a large checkpoint, and at ~1 us of Python apiece that was most of
// an async save's stall. See ckptio/pickling.py for what each must match.
#pragma once

#include <pybind11/pybind11.h>

// Adds persistent_id_filter and dense_reducer to the module.
void DefinePickleFastPath(pybind11::module_& m);
