/* cblas_sgemm for MLX's Linux CPU backend: OpenBLAS behind it, one-row products as GEMV.
 *
 * MLX's Linux wheel resolves cblas_sgemm (its only float32 BLAS call) from the global
 * symbol scope; blas.py loads this library there before mlx.core. OpenBLAS (the
 * scipy-openblas32 wheel) exports its functions only under a "scipy_" prefix, so this
 * file gives them the plain name MLX looks for.
 *
 * Why the GEMV branch: a single-sequence decode step multiplies one row by every weight
 * matrix, so it is a stream of the weights through memory. OpenBLAS's and MKL's sgemm
 * run such an M=1 product on about one core's bandwidth (~10 GB/s here), while
 * OpenBLAS's sgemv splits the matrix over its threads (~23 GB/s with 2). Each row of C
 * is one sgemv: C[i,:] = alpha * op(B)^T A[i,:] + beta * C[i,:].
 *
 * blas.py binds the two OpenBLAS entry points and the row limit with vrm_bind().
 */
#include <stddef.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 }; /* CBLAS enum values */

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);

static sgemm_fn gemm;
static sgemv_fn gemv;
static int gemv_max_rows;
static long gemv_products; /* how many products took the GEMV branch (for tests) */

long vrm_gemv_products(void) { return gemv_products; }

void vrm_bind(void *sgemm, void *sgemv, int max_rows) {
    gemm = (sgemm_fn)sgemm;
    gemv = (sgemv_fn)sgemv;
    gemv_max_rows = max_rows;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
    if (gemv != NULL && order == ROW_MAJOR && m <= gemv_max_rows && n > 0 && k > 0) {
        gemv_products++;
        for (int i = 0; i < m; i++) {
            /* row i of op(A): contiguous if A is not transposed, else a strided column */
            const float *x = trans_a == NO_TRANS ? a + (ptrdiff_t)i * lda : a + i;
            int incx = trans_a == NO_TRANS ? 1 : lda;
            float *y = c + (ptrdiff_t)i * ldc;
            if (trans_b == NO_TRANS) /* B is k x n: y = B^T x */
                gemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, x, incx, beta, y, 1);
            else /* B is n x k: y = B x */
                gemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, x, incx, beta, y, 1);
        }
        return;
    }
    gemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
