# Warnings as errors for first-party targets only (never generated code).
function(icd_set_warnings target)
  target_compile_options(${target} PRIVATE
    -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wno-sign-conversion)
  set_target_properties(${target} PROPERTIES COMPILE_WARNING_AS_ERROR ON)
  target_compile_features(${target} PUBLIC cxx_std_17)
endfunction()
