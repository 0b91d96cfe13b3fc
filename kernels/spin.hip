// spin.hip: keep the GPU busy for about `cycles` clock cycles. The profiler launches it first so that
// the kernels it times queue up behind it: their events then measure device time, not host launch gaps.
extern "C" __global__ void spin(long long cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) {
    }
}
