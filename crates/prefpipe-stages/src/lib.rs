//! prefpipe-stages
