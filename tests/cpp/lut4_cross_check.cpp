// The int4/nf4 CPU kernels of one instruction set against a float64 reference written here, on
// shapes that reach every branch of csrc/cpu/lut4_core.h. Built and run by
// tests/test_cpu_int4_nf4.py::test_neon_kernels_under_qemu for Arm NEON (cross-compiled,
// run under qemu-aarch64), the one path this x86 machine cannot run natively. The kernel
// objects are compiled twice (LOWBIT_ISA_SUFFIX=scalar and =ISA); exit status 0 = all pass.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>
#include "common/int4_matmul.h"
#include "common/nf4_matmul.h"
namespace lowbit { namespace cpu {
void int4_matmul_kernel_neon(const Int4MatmulArgs&, int);
void int4_matmul_kernel_scalar(const Int4MatmulArgs&, int);
void nf4_matmul_kernel_neon(const Nf4MatmulArgs&, int);
void nf4_matmul_kernel_scalar(const Nf4MatmulArgs&, int);
}}
using namespace lowbit;
std::mt19937 rng(7);
float urand(){ return std::uniform_real_distribution<float>(-1,1)(rng); }
std::vector<uint16_t> to16(const std::vector<float>& v, int dt){ std::vector<uint16_t> o(v.size()); for(size_t i=0;i<v.size();i++) o[i]= dt==1? float_to_half(v[i]) : float_to_bf16(v[i]); return o; }
double relerr(const std::vector<float>& a, const std::vector<double>& r){ double num=0, den=0; for(size_t i=0;i<a.size();i++){ num+=(a[i]-r[i])*(a[i]-r[i]); den+=r[i]*r[i]; } return std::sqrt(num/std::max(den,1e-30)); }
int fails=0, runs=0;
void check(const char* what, double e, double tol){ runs++; if(!(e<=tol)){ fails++; printf("FAIL %s err=%g\n", what, e);} }
int main(){
  const int dts[3]={0,1,2}; const double tol[3]={1e-5,2e-3,1.6e-2};
  // int4
  struct S{long M,N,K,G;}; S shapes[]={{1,8,32,32},{1,37,512,128},{2,33,128,64},{3,20,96,32},{5,70,256,128},{9,130,384,128},{1,8,40,40},{4,5,48,16},{33,17,64,32},{1,3,2,2}};
  for (auto s: shapes) for (int dt: dts) for (int asym=0; asym<2; ++asym) for (int th: {1,2}) {
    long M=s.M,N=s.N,K=s.K,G=s.G, ng=K/G;
    std::vector<uint8_t> q(N * K / 2);
    for (auto& b : q) b = rng();
    std::vector<float> sc(N * ng), ze(N * ng), x(M * K), bias(N);
    for (auto& v : sc) v = 0.01f + 0.1f * std::fabs(urand());
    for (auto& v : ze) v = (float)(rng() % 16);
    for (auto& v : x) v = urand();
    for (auto& v : bias) v = urand();
    // quantize x/scales to dtype
    std::vector<uint16_t> x16=to16(x,dt), sc16=to16(sc,dt), ze16=to16(ze,dt), b16=to16(bias,dt);
    std::vector<float> xf(M*K), scf(N*ng), zef(N*ng), bf(N);
    for(long i=0;i<M*K;i++) xf[i]= dt? load_as_float(x16.data(),i,dt) : x[i];
    for(long i=0;i<N*ng;i++){ scf[i]= dt? load_as_float(sc16.data(),i,dt):sc[i]; zef[i]= dt? load_as_float(ze16.data(),i,dt):ze[i]; }
    for(long i=0;i<N;i++) bf[i]= dt? load_as_float(b16.data(),i,dt):bias[i];
    std::vector<double> ref(M*N);
    for(long m=0;m<M;m++) for(long n=0;n<N;n++){ double acc=0; for(long k=0;k<K;k++){ uint8_t b=q[n*K/2+k/2]; int v= (k&1)? b>>4 : b&15; float z= asym? zef[n*ng+k/G] : 8.f; float w=((float)v - z)*scf[n*ng+k/G]; acc+=(double)w*xf[m*K+k]; } ref[m*N+n]=acc+bf[n]; }
    for (int isa=0; isa<2; ++isa) {
      std::vector<float> outf(M*N); std::vector<uint16_t> out16(M*N);
      Int4MatmulArgs a; a.x= dt? (const void*)x16.data() : (const void*)x.data(); a.x_dtype=dt; a.x_row_stride=K; a.qweight=q.data();
      a.scales= dt? (const void*)sc16.data():(const void*)sc.data(); a.scales_dtype=dt; a.zeros= asym? (dt?(const void*)ze16.data():(const void*)ze.data()) : nullptr; a.zeros_dtype=dt;
      a.bias= dt?(const void*)b16.data():(const void*)bias.data(); a.bias_dtype=dt; a.out= dt? (void*)out16.data() : (void*)outf.data(); a.out_dtype=dt; a.M=M; a.N=N; a.K=K; a.group_size=G;
      if(isa) cpu::int4_matmul_kernel_neon(a, th); else cpu::int4_matmul_kernel_scalar(a, th);
      if(dt) for(long i=0;i<M*N;i++) outf[i]=load_as_float(out16.data(),i,dt);
      char buf[200]; snprintf(buf,200,"int4 %s M=%ld N=%ld K=%ld G=%ld dt=%d asym=%d th=%d", isa?"neon":"scalar", M,N,K,G,dt,asym,th);
      check(buf, relerr(outf, ref), tol[dt]);
    }
  }
  // nf4
  struct T{long M,N,K,B; int dq;}; T nshapes[]={{1,64,256,64,0},{1,64,256,64,1},{2,33,96,64,1},{3,21,130,32,0},{1,7,33,32,1},{6,40,512,256,0},{1,50,4096,4096,1},{20,70,64,128,0},{1,16,96,64,0},{1,300,1024,64,1}};
  for (auto s: nshapes) for (int dt: dts) for (int th: {1,2}) {
    long M=s.M,N=s.N,K=s.K,B=s.B; long numel=N*K, nb=(numel+B-1)/B, n2=(nb+255)/256;
    std::vector<uint8_t> q((numel + 1) / 2);
    for (auto& b : q) b = rng();
    std::vector<float> am(nb), x(M*K), bias(N), code(256), sc2(n2); std::vector<uint8_t> aq(nb);
    for (auto& v : am) v = 0.01f + std::fabs(urand());
    for (auto& v : x) v = urand();
    for (auto& v : bias) v = urand();
    for (int i = 0; i < 256; i++) code[i] = (i - 128) / 128.f;
    for (auto& v : sc2) v = 0.5f + std::fabs(urand());
    for (auto& v : aq) v = rng();
    const float off = 0.3f;
    std::vector<uint16_t> x16=to16(x,dt), b16=to16(bias,dt); std::vector<float> xf(M*K), bf(N);
    for (long i = 0; i < M * K; i++) xf[i] = dt ? load_as_float(x16.data(), i, dt) : x[i];
    for (long i = 0; i < N; i++) bf[i] = dt ? load_as_float(b16.data(), i, dt) : bias[i];
    std::vector<double> ref(M*N);
    for(long m=0;m<M;m++) for(long n=0;n<N;n++){ double acc=0; for(long k=0;k<K;k++){ long e=n*K+k; uint8_t b=q[e>>1]; int v=(e&1)? b&15 : b>>4; long blk=e/B; float a= s.dq? (float)(code[aq[blk]]*sc2[blk/256]) + off : am[blk]; float w=kNf4Code[v]*a; acc+=(double)w*xf[m*K+k]; } ref[m*N+n]=acc+bf[n]; }
    for (int isa=0; isa<2; ++isa) {
      std::vector<float> outf(M*N); std::vector<uint16_t> out16(M*N);
      Nf4MatmulArgs a; a.x= dt? (const void*)x16.data() : (const void*)x.data(); a.x_dtype=dt; a.x_row_stride=K; a.qweight=q.data();
      if(s.dq){ a.absmax=aq.data(); a.absmax_scale=sc2.data(); a.absmax_code=code.data(); a.absmax_offset=off; } else a.absmax=am.data();
      a.bias= dt?(const void*)b16.data():(const void*)bias.data(); a.bias_dtype=dt; a.out= dt? (void*)out16.data() : (void*)outf.data(); a.out_dtype=dt; a.M=M; a.N=N; a.K=K; a.blocksize=B;
      if(isa) cpu::nf4_matmul_kernel_neon(a, th); else cpu::nf4_matmul_kernel_scalar(a, th);
      if(dt) for(long i=0;i<M*N;i++) outf[i]=load_as_float(out16.data(),i,dt);
      char buf[200]; snprintf(buf,200,"nf4 %s M=%ld N=%ld K=%ld B=%ld dq=%d dt=%d th=%d", isa?"neon":"scalar", M,N,K,B,s.dq,dt,th);
      check(buf, relerr(outf, ref), tol[dt]);
    }
  }
  printf("%d runs, %d failures\n", runs, fails); return fails != 0;
}
