/* llama.cpp's abort callback, in C so that llama_decode can poll it between graph nodes
 * without taking Python's GIL. `flag` points at one byte that orcd's CancelFlag sets to 1;
 * the callback returns true once it is set. The module itself exports nothing to Python:
 * orcd loads this shared object with ctypes and takes the function's address. */
#include <Python.h>
#include <stdbool.h>

PyMODINIT_FUNC PyInit__abortflag(void);

bool orcd_abort_requested(void *flag)
{
    return __atomic_load_n((const unsigned char *)flag, __ATOMIC_ACQUIRE) != 0;
}

static struct PyModuleDef abortflag_module = {
    PyModuleDef_HEAD_INIT, "_abortflag",
    "The C abort callback orcd hands to llama.cpp (see orcd/engine.py).", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__abortflag(void)
{
    return PyModule_Create(&abortflag_module);
}
