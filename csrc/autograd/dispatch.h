// The typed handle of one of our ops, for the C++ autograd kernels that call the ops below the
// Autograd key. Each call site keeps it in a function-local static (looked up once).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace mapopt {

template <class Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace mapopt
