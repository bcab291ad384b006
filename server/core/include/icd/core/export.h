// Symbol visibility for the shared engine library: only what is marked
// ICD_CORE_API is exported, so LibTorch's symbols stay inside libicd_core.
#ifndef ICD_CORE_EXPORT_H_
#define ICD_CORE_EXPORT_H_

#if defined(ICD_CORE_BUILDING)
#define ICD_CORE_API __attribute__((visibility("default")))
#else
#define ICD_CORE_API
#endif

#endif  // ICD_CORE_EXPORT_H_
