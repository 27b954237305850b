// Makes ep_ops._C importable as a Python module; the ops themselves register on load through
// TORCH_LIBRARY / TORCH_LIBRARY_IMPL static initializers. Its two Python functions serve
// Buffer.dispatch (dispatch_counts.h).
#include <Python.h>

#include "dispatch_counts.h"

namespace {

// request_dispatch_counts(group_name: str) -> None
PyObject* request_dispatch_counts(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;  // not a str: the TypeError is set
  ep_ops::request_dispatch_counts(name);
  Py_RETURN_NONE;
}

// take_dispatch_counts(group_name: str) -> list[int] | None
PyObject* take_dispatch_counts(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;  // not a str: the TypeError is set
  auto counts = ep_ops::take_dispatch_counts(name);
  if (!counts) Py_RETURN_NONE;
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(counts->size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < counts->size(); ++i) {
    PyObject* value = PyLong_FromLongLong((*counts)[i]);
    if (value == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), value);
  }
  return list;
}

PyMethodDef methods[] = {
    {"request_dispatch_counts", request_dispatch_counts, METH_O,
     "Asks the group's next NVLink exact-mode dispatch to leave its per-expert counts on the host."},
    {"take_dispatch_counts", take_dispatch_counts, METH_O,
     "The per-expert counts the group's last NVLink exact-mode dispatch left (a list), once; None "
     "when it left none."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
