//! Counter-based noise: Philox4x32-10 and Box-Muller normals.
