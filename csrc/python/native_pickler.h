// A protocol-2 pickler in C for what checkpoints are made of, writing the
// bytes pickle.Pickler would write (see native_pickler.cc).
#pragma once

#include <pybind11/pybind11.h>

// Adds pickle_protocol2 to the module.
void DefineNativePickler(pybind11::module_& m);
