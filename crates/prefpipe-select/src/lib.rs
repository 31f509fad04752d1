//! prefpipe-select
