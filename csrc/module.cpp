// Makes ep_ops._C importable as a Python module; the ops themselves register on load through
// TORCH_LIBRARY / TORCH_LIBRARY_IMPL static initializers.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
