# Environment variables that size numpy's BLAS thread pool. Prep does no linear algebra, so its
# processes set them to 1 (unless the user chose) before numpy loads: the pool would only spin.
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
