#include <stdio.h>
#include <cpuid.h>
int main(){unsigned a,b,c,d; unsigned a1,b1,c1,d1;
 __get_cpuid_count(0,0,&a,&b,&c,&d); unsigned max=a;
 char vendor[13]; *(unsigned*)vendor=b;*(unsigned*)(vendor+4)=d;*(unsigned*)(vendor+8)=c;vendor[12]=0;
 __get_cpuid_count(1,0,&a1,&b1,&c1,&d1);
 printf("vendor=%s maxleaf=%u fam/model sig=0x%x\n",vendor,max,a1);
 printf("avx=%d fma=%d osxsave=%d\n",(c1>>28)&1,(c1>>12)&1,(c1>>27)&1);
 __get_cpuid_count(7,0,&a,&b,&c,&d);
 printf("avx2=%d avx512f=%d avx512dq=%d avx512bw=%d avx512vl=%d avx512_vnni=%d avx512_bf16?=- amx_tile=%d amx_int8=%d amx_bf16=%d\n",
  (b>>5)&1,(b>>16)&1,(b>>17)&1,(b>>30)&1,(b>>31)&1,(c>>11)&1,(d>>24)&1,(d>>25)&1,(d>>22)&1);
 __get_cpuid_count(7,1,&a,&b,&c,&d);
 printf("avx_vnni=%d avx512_bf16=%d avx_vnni_int8=%d avx_ne_convert=%d\n",(a>>4)&1,(a>>5)&1,(d>>4)&1,(d>>5)&1);
 unsigned lo=0,hi=0; if((c1>>27)&1) __asm__ volatile("xgetbv":"=a"(lo),"=d"(hi):"c"(0)); printf("xcr0=0x%x (ymm=%d zmm=%d amx=%d)\n",lo,(lo&6)==6,(lo&0xe6)==0xe6,(lo>>17)&3);
 return 0;}
