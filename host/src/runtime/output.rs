//! A module's output, taken out of guest memory while wasmtime lifts the
//! call's result. It must be then: once the call returns, wasmtime has run
//! the guest's post-return function, which frees the output, and the guest's
//! allocator may already have written over its first bytes (a JavaScript
//! guest's did). Its size is checked first, so an output over the reply
//! limit is never copied: the host holds at most the limit.
//!
//! Lifting cannot take arguments, so the limit travels in a thread-local
//! that the runtime sets around each poll of a guest (the lift runs inside
//! one, on the polling thread).

use std::cell::Cell;

use wasmtime::ValRaw;
use wasmtime::component::__internal::{CanonicalAbiInfo, InstanceType, InterfaceType, LiftContext};
use wasmtime::component::{ComponentType, Lift, WasmList};

thread_local! {
    static LIMIT: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Runs `f` with `limit` as the size limit of outputs lifted meanwhile.
pub(super) fn with_limit<R>(limit: usize, f: impl FnOnce() -> R) -> R {
    let previous = LIMIT.replace(limit);
    let result = f();
    LIMIT.set(previous);
    result
}

/// A `list<u8>` result, copied out, or only its length if over the limit.
pub(super) enum Output {
    Bytes(Vec<u8>),
    TooLarge(usize),
}

impl Output {
    /// `len` bytes at `ptr`, which wasmtime has checked lie in memory.
    fn take(cx: &LiftContext<'_>, ptr: usize, len: usize) -> Output {
        if len > LIMIT.get() {
            return Output::TooLarge(len);
        }
        Output::Bytes(cx.memory()[ptr..][..len].to_vec())
    }
}

// SAFETY: the same ABI and type check as `WasmList<u8>`: a `list<u8>`.
unsafe impl ComponentType for Output {
    type Lower = <WasmList<u8> as ComponentType>::Lower;

    const ABI: CanonicalAbiInfo = <WasmList<u8> as ComponentType>::ABI;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
        <WasmList<u8> as ComponentType>::typecheck(ty, types)
    }
}

// SAFETY: lifts through `WasmList<u8>`, which validates the pointer and
// length against the guest's memory, and only then reads them.
unsafe impl Lift for Output {
    fn linear_lift_from_flat(
        cx: &mut LiftContext<'_>,
        ty: InterfaceType,
        src: &Self::Lower,
    ) -> wasmtime::Result<Self> {
        let list = WasmList::<u8>::linear_lift_from_flat(cx, ty, src)?;
        let [ptr, _len]: &[ValRaw; 2] = src;
        Ok(Output::take(cx, ptr.get_u32() as usize, list.len()))
    }

    fn linear_lift_from_memory(
        cx: &mut LiftContext<'_>,
        ty: InterfaceType,
        bytes: &[u8],
    ) -> wasmtime::Result<Self> {
        let list = WasmList::<u8>::linear_lift_from_memory(cx, ty, bytes)?;
        let ptr = u32::from_le_bytes(bytes[..4].try_into().expect("a list is two u32s"));
        Ok(Output::take(cx, ptr as usize, list.len()))
    }
}
