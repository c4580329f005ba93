//! smol transport (work in progress).
