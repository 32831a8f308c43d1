// Python module for the CUDA kernels; the kernels themselves register with TORCH_LIBRARY_IMPL(mmdkernels, CUDA).
#include <Python.h>

static struct PyModuleDef mmdkernels_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&mmdkernels_cuda_module); }
